"""Process entry points (`api`, `worker`, `serve`) and the private redis-server."""
