"""The generation engine: one thread owns the model and every tensor; requests reach it as plain-data
steering plans."""
