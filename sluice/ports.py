"""Free loopback ports for stacks started beside others (tests, benchmarks, extra replicas)."""

from __future__ import annotations

import socket
from contextlib import ExitStack


def free_ports(count: int) -> list[int]:
    """Distinct free ports (all sockets held open while choosing)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_offset(ports: list[int]) -> int:
    """An offset that puts every service's /metrics port (gRPC port + offset) on a free port."""
    for offset in range(1000, 3000, 7):
        if all(p + offset < 65536 and port_free(p + offset) for p in ports):
            return offset
    raise RuntimeError("no free block of metrics ports")


def free_port_block(count: int, offset: int = 1000) -> int:
    """A first port such that `count` ports from it, and the same shifted by `offset`, are free."""
    for first in range(21000, 60000 - offset, 37):
        if all(port_free(first + i) and port_free(first + i + offset) for i in range(count)):
            return first
    raise RuntimeError("no free block of ports")
