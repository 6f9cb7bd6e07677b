"""The HTTP API: FastAPI app, routes, request parsing, response encoding, problems."""
