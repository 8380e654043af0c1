"""Wake drivers: how a sleeping backend is started and put back to sleep.

    none      always on; never started or stopped
    fly       the Fly Machines API: start, wait for `started`, stop (or suspend), wait
    wol       a Wake-on-LAN magic packet; stopping is an optional command (e.g. ssh … suspend)
    command   run a configured command to start (any cloud's CLI), another to stop

A driver only starts and stops the machine (and, where it can, suspends it and tells its real
state: `state()` is "up", "down", "changing" or "unknown"); the pool then waits until Ollama
answers with the model loaded and reconciles its books with `state()`. Failures raise
`WakeFailed` with a reason fit for logs and notices (never a token, never a response body).
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

WOL_REPEATS = 3  # magic packets per wake
WOL_GAP = 0.1  # seconds between them


class WakeFailed(ModelUnavailable):
    """The backend could not be started (or did not become ready in time)."""


UP, DOWN, CHANGING, UNKNOWN = "up", "down", "changing", "unknown"


class WakeDriver(Protocol):
    kind: str
    always_on: bool

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def state(self) -> str:
        """The machine's real state: UP, DOWN, CHANGING or UNKNOWN (the driver cannot tell)."""
        ...

    async def aclose(self) -> None: ...


class NoWake:
    """An always-on backend (a home GPU that never sleeps, or plain `OLLAMA_HOST`)."""

    kind = "none"
    always_on = True

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def state(self) -> str:
        return UP

    async def aclose(self) -> None:
        return None


# Fly's machine states (fly.io/docs/machines/machine-states) in the drivers' words.
_FLY_STATES = {
    "started": UP,
    "stopped": DOWN,
    "suspended": DOWN,
    "created": DOWN,
    "failed": DOWN,
    "destroyed": DOWN,
}
_FLY_SETTLING = ("stopping", "suspending", "replacing", "destroying")
_STOP_ROUNDS = 5  # waits of Fly's (at most 60 s each) for a stop before it counts as failed


class FlyWake:
    """One Fly Machine through the Machines API (api.machines.dev by default).

    `start` knows the machine's state: started is done; stopping or suspending is waited out
    (`GET /wait?state=stopped`) before `POST /start`; a 412 from start (the machine changed
    state under us) waits and starts again; a 408 from `/wait` (Fly's own 60 s at most) waits
    again, until the pool's wake deadline cancels it. `stop` (or `suspend`, with
    `suspend=True`, where Fly supports it: resuming takes well under a second) waits until the
    machine has stopped, so the GPU is known to have stopped billing.
    """

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
        suspend: bool = False,
    ) -> None:
        self.app = app
        self.machine = machine
        self.suspends = suspend
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

    async def _call(
        self, method: str, path: str, ok: tuple[int, ...] = (), **params: str | int
    ) -> httpx.Response:
        try:
            response = await self._http.request(method, path, params=params or None)
        except httpx.HTTPError as exc:
            raise WakeFailed(
                f"fly: the Machines API did not answer ({type(exc).__name__})"
            ) from exc
        if response.status_code >= 400 and response.status_code not in ok:
            raise WakeFailed(f"fly: the Machines API answered HTTP {response.status_code}")
        return response

    async def fly_state(self) -> str:
        """The machine's state as Fly reports it (started, stopped, starting, …)."""
        response = await self._call("GET", self._path)
        return str(response.json().get("state", "unknown"))

    async def state(self) -> str:
        fly = await self.fly_state()
        return _FLY_STATES.get(fly, CHANGING)

    async def _wait(self, state: str, rounds: int | None = None) -> None:
        """Wait for `state`; Fly answers 408 after its own timeout (60 s at most), so ask
        again: for ever when starting (the pool's wake deadline cancels it), `rounds` times
        when stopping."""
        asked = 0
        while rounds is None or asked < rounds:
            asked += 1
            response = await self._call(
                "GET", f"{self._path}/wait", (408,), state=state, timeout=self._wait_timeout
            )
            if response.status_code != 408:
                return
        raise WakeFailed(f"fly: the machine did not reach {state} in time")

    async def start(self) -> None:
        for _ in range(5):
            current = await self.fly_state()
            if current == "started":
                break
            if current in _FLY_SETTLING:
                await self._wait("suspended" if current == "suspending" else "stopped")
                continue
            if current != "starting":
                response = await self._call("POST", f"{self._path}/start", (412,))
                if response.status_code == 412:  # it changed state under us: look again
                    log.info("fly machine %s/%s was busy; retrying", self.app, self.machine)
                    await asyncio.sleep(0.2)
                    continue
            await self._wait("started")
            break
        else:
            raise WakeFailed("fly: the machine would not start")
        log.info("fly machine %s/%s started", self.app, self.machine)

    async def stop(self) -> None:
        if self.suspends:
            response = await self._call("POST", f"{self._path}/suspend", (400, 412))
            if response.status_code < 400:
                await self._wait("suspended", _STOP_ROUNDS)
                log.info("fly machine %s/%s suspended", self.app, self.machine)
                return
            log.info("fly machine %s/%s cannot suspend; stopping it", self.app, self.machine)
        await self._call("POST", f"{self._path}/stop")
        await self._wait("stopped", _STOP_ROUNDS)
        log.info("fly machine %s/%s stopped", self.app, self.machine)

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
        """Send the packet WOL_REPEATS times, a moment apart: it is UDP and may be lost."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            for n in range(WOL_REPEATS):
                if n:
                    await asyncio.sleep(WOL_GAP)
                try:
                    sock.sendto(self.packet, (self.broadcast, self.port))
                except OSError as exc:
                    raise WakeFailed(
                        f"wol: the magic packet could not be sent ({exc.strerror})"
                    ) from exc
        log.info("wake-on-lan packet sent %dx to %s:%d", WOL_REPEATS, self.broadcast, self.port)

    async def stop(self) -> None:
        await self._stop.stop()

    async def state(self) -> str:
        return UNKNOWN  # a home machine has no API; Ollama answering is all we know

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
        self.output = ""  # the last command's output, shortened

    async def start(self) -> None:
        if self._start:
            await self._run(self._start, "start")

    async def stop(self) -> None:
        if self._stop:
            await self._run(self._stop, "stop")

    async def state(self) -> str:
        return UNKNOWN

    async def _run(self, argv: list[str], what: str) -> None:
        """Run it; its output (both streams, the end of each) goes to the admin log, never to
        users, who see the exit code."""
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            raise WakeFailed(f"command: the {what} command could not run ({exc.strerror})") from exc
        try:
            out, err = await asyncio.wait_for(process.communicate(), self._timeout)
        except TimeoutError as exc:
            process.kill()
            await process.wait()
            raise WakeFailed(f"command: the {what} command took over {self._timeout:g}s") from exc
        self.output = _tail(out) + _tail(err)
        if process.returncode != 0:
            log.warning("%s command failed: %s", what, self.output)
            raise WakeFailed(f"command: the {what} command exited with {process.returncode}")
        log.info("%s command %s finished: %s", what, argv[0], self.output or "(no output)")

    async def aclose(self) -> None:
        return None


def _tail(data: bytes | None, limit: int = 500) -> str:
    return (data or b"").decode(errors="replace").strip()[-limit:]
