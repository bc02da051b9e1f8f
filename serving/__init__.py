"""Serving catalog models: the BentoML service, its pipeline manager and generation queue, and `txt2img generate`."""
