"""The `pluristeer` command line, the local stack it supervises (`up`) and the demos."""
