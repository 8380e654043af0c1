"""Wake drivers: how a sleeping backend is started and put back to sleep.

    none      always on; never started or stopped
    fly       the Fly Machines API: start, wait for `started`, stop
    wol       a Wake-on-LAN magic packet; stopping is an optional command (e.g. ssh … suspend)
    command   run a configured command to start (any cloud's CLI), another to stop

A driver only starts and stops the machine; the pool then waits until Ollama answers with the
model loaded. Failures raise `WakeFailed` with a reason fit for logs and notices (never a token,
never a response body).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import Protocol

import httpx
from pydantic import SecretStr

from bot.errors import ModelUnavailable

log = logging.getLogger(__name__)


class WakeFailed(ModelUnavailable):
    """The backend could not be started (or did not become ready in time)."""


class WakeDriver(Protocol):
    kind: str
    always_on: bool

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def aclose(self) -> None: ...


class NoWake:
    """An always-on backend (a home GPU that never sleeps, or plain `OLLAMA_HOST`)."""

    kind = "none"
    always_on = True

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class FlyWake:
    """Start and stop one Fly Machine through the Machines API (api.machines.dev by default)."""

    kind = "fly"
    always_on = False

    def __init__(
        self,
        *,
        app: str,
        machine: str,
        token: SecretStr | None,
        api_url: str = "https://api.machines.dev",
        wait_timeout: int = 60,
        http_timeout: float = 30.0,
    ) -> None:
        self.app = app
        self.machine = machine
        self._wait_timeout = wait_timeout
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=api_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(http_timeout + wait_timeout, connect=5.0),
        )

    @property
    def _path(self) -> str:
        return f"/v1/apps/{self.app}/machines/{self.machine}"

    async def _call(self, method: str, path: str, **params: str | int) -> httpx.Response:
        try:
            response = await self._http.request(method, path, params=params or None)
        except httpx.HTTPError as exc:
            raise WakeFailed(
                f"fly: the Machines API did not answer ({type(exc).__name__})"
            ) from exc
        if response.status_code >= 400:
            raise WakeFailed(f"fly: the Machines API answered HTTP {response.status_code}")
        return response

    async def state(self) -> str:
        """The machine's state as Fly reports it (started, stopped, starting, …)."""
        response = await self._call("GET", self._path)
        return str(response.json().get("state", "unknown"))

    async def start(self) -> None:
        if await self.state() != "started":
            await self._call("POST", f"{self._path}/start")
        await self._call("GET", f"{self._path}/wait", state="started", timeout=self._wait_timeout)
        log.info("fly machine %s/%s started", self.app, self.machine)

    async def stop(self) -> None:
        await self._call("POST", f"{self._path}/stop")
        log.info("fly machine %s/%s stopping", self.app, self.machine)

    async def aclose(self) -> None:
        await self._http.aclose()


def magic_packet(mac: str) -> bytes:
    """The Wake-on-LAN packet: six 0xFF bytes, then the MAC address sixteen times."""
    digits = "".join(c for c in mac if c not in ":-.").lower()
    if len(digits) != 12 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"not a MAC address: {mac!r}")
    return b"\xff" * 6 + bytes.fromhex(digits) * 16


class WolWake:
    """Wake a home machine with a magic packet; stop it with an optional command."""

    kind = "wol"
    always_on = False

    def __init__(
        self,
        *,
        mac: str,
        broadcast: str = "255.255.255.255",
        port: int = 9,
        stop_command: Sequence[str] | None = None,
        command_timeout: float = 60.0,
    ) -> None:
        self.packet = magic_packet(mac)
        self.broadcast = broadcast
        self.port = port
        self._stop = CommandWake(start=None, stop=stop_command, timeout=command_timeout)

    async def start(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            try:
                sock.sendto(self.packet, (self.broadcast, self.port))
            except OSError as exc:
                raise WakeFailed(
                    f"wol: the magic packet could not be sent ({exc.strerror})"
                ) from exc
        log.info("wake-on-lan packet sent to %s:%d", self.broadcast, self.port)

    async def stop(self) -> None:
        await self._stop.stop()

    async def aclose(self) -> None:
        return None


class CommandWake:
    """Run a command to start the machine (and optionally one to stop it)."""

    kind = "command"
    always_on = False

    def __init__(
        self,
        *,
        start: Sequence[str] | None,
        stop: Sequence[str] | None = None,
        timeout: float = 120.0,
    ) -> None:
        self._start = list(start) if start else None
        self._stop = list(stop) if stop else None
        self._timeout = timeout

    async def start(self) -> None:
        if self._start:
            await self._run(self._start, "start")

    async def stop(self) -> None:
        if self._stop:
            await self._run(self._stop, "stop")

    async def _run(self, argv: list[str], what: str) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            raise WakeFailed(f"command: the {what} command could not run ({exc.strerror})") from exc
        try:
            _, err = await asyncio.wait_for(process.communicate(), self._timeout)
        except TimeoutError as exc:
            process.kill()
            await process.wait()
            raise WakeFailed(f"command: the {what} command took over {self._timeout:g}s") from exc
        if process.returncode != 0:
            # The command's own stderr goes to the admin log only; users see the exit code.
            log.warning("%s command failed: %s", what, err.decode(errors="replace")[-500:])
            raise WakeFailed(f"command: the {what} command exited with {process.returncode}")
        log.info("%s command %s finished", what, argv[0])

    async def aclose(self) -> None:
        return None
