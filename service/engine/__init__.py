"""The generation engine: one thread owns the model and every tensor; requests reach it as plain-data
steering plans, through `client` (torch-free: all that routes import from here).

`client` (the process's `EngineClient`, the `Engine` protocol, the plain types of `types`), `blend` (a blend's
calibration, shared with the worker) and `metrics` (its Prometheus collector) are torch-free. The engine
side: `engine` (the loop), `batch` (the running batch and its KV cache), `decoding` (tokenizing, sampling,
text and stop strings), `scoring` (the score scheduler), `interventions` (plans resolved into steering) and
`tools` (exports and imports, on the client's tools thread).
"""
