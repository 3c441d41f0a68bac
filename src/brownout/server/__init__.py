"""The HTTP server of `brownout serve`: the FastAPI app, its runtime and its metrics."""
