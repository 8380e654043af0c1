"""Loopback plumbing shared by the fakes and the tests: free ports, and serving an aiohttp app
on 127.0.0.1 at a port the OS picks."""

from __future__ import annotations

import socket
import ssl

from aiohttp import web


def listen_backlog() -> int:
    """The accept queue a production server gets on this machine: Go's net package listens
    with /proc/sys/net/core/somaxconn (`maxListenerBacklog` in src/net/sock_linux.go), and so
    does Ollama, which serves with it. aiohttp's own default is 128: a burst of more new
    connections than that overflows the queue, the kernel drops their SYNs and the clients
    send them again a second later (TcpExtListenOverflows, TCPSynRetrans in /proc/net/netstat)
    -- a stall a real Ollama would not cause."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read().split()[0]) or socket.SOMAXCONN
    except (OSError, ValueError, IndexError):
        return socket.SOMAXCONN


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_url() -> str:
    """An http URL on loopback where nothing answers: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


async def serve(
    app: web.Application,
    *,
    ssl_context: ssl.SSLContext | None = None,
    shutdown_timeout: float = 60.0,
) -> tuple[web.AppRunner, int]:
    """Start `app` on 127.0.0.1 at an OS-chosen port; returns the runner (to clean up) and port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(
            runner, "127.0.0.1", 0, ssl_context=ssl_context, backlog=listen_backlog()
        )
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])
