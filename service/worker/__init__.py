"""The worker: the batching loop, its pre / forward / post stages, hot reload, probes."""
