from tests.service.conftest import redis_url, settings  # noqa: F401  (the service fixtures)
