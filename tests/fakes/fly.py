"""A loopback fake of the Fly Machines API, and an Ollama that sleeps with its machine.

`FakeFly` speaks the endpoints the `fly` wake driver uses, as api.machines.dev does:

    GET  /v1/apps/{app}/machines/{id}                      the machine (with its `state`)
    POST /v1/apps/{app}/machines/{id}/start                {"previous_state", "migrated", …}
    GET  /v1/apps/{app}/machines/{id}/wait?state=S&timeout=N    {"ok": true} or 408
    POST /v1/apps/{app}/machines/{id}/stop                 {"ok": true}
    POST /v1/apps/{app}/machines/{id}/suspend              {"ok": true}

Where its behaviour comes from:
- states (created, started, stopped, suspended; starting, stopping, suspending transient):
  fly.io/docs/machines/machine-states;
- `/wait` blocks until the state is reached or its `timeout` (at most 60 s) passes, then
  answers 408 (flyctl's internal/machine/wait.go calls it again in a loop until its own
  deadline): `wait_calls` records the states waited for;
- a start while the machine is stopping or suspending is refused with 412 (Fly's
  `failed_precondition`; flyctl retries it): `start_refused` counts them;
- a stop takes `stop_seconds` in `stopping`, a suspend `stop_seconds` in `suspending`.

Requests need `Authorization: Bearer <token>` (401 otherwise); unknown apps or machines are 404.
It records every call in `calls` as (method, path, query). A start takes `boot_seconds` before
the machine reports `started`, and then brings up the `MachineOllama` attached to it.
`garbage = True` makes `GET` of the machine answer 200 with a body that is not JSON (a broken
proxy), for failures that are not HTTP errors.

`MachineOllama` is the fake Ollama that answers 503 while its machine is down (as Fly's proxy
does for a stopped machine) and serves normally once it is up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from tests.fakes.loopback import serve
from tests.fakes.ollama import FakeOllama


class MachineOllama(FakeOllama):
    """A FakeOllama that is down (503) until `up` is true, or `is_up()` says so."""

    def __init__(self, *args: Any, is_up: Callable[[], bool] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.up = False
        self._is_up = is_up
        self.refused = 0

    def serving(self) -> bool:
        return self.up or (self._is_up is not None and self._is_up())

    def _down(self) -> web.Response:
        self.refused += 1
        return web.json_response({"error": "no machine is running"}, status=503)

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await super()._handle_chat(request) if self.serving() else self._down()

    async def _handle_tags(self, request: web.Request) -> web.Response:
        return await super()._handle_tags(request) if self.serving() else self._down()

    async def _handle_root(self, request: web.Request) -> web.Response:
        return await super()._handle_root(request) if self.serving() else self._down()


class FakeFly:
    def __init__(
        self,
        *,
        app: str = "bot-gpu",
        machine: str = "d8d9e1a2b3c4d5",
        token: str = "fly-test-token-123",
        boot_seconds: float = 0.0,
        ollama: MachineOllama | None = None,
    ) -> None:
        self.app = app
        self.machine = machine
        self.token = token
        self.boot_seconds = boot_seconds
        self.ollama = ollama
        self.state = "stopped"
        self.stop_seconds = 0.0
        self.garbage = False
        self.start_refused = 0
        self.wait_calls: list[str] = []
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._booting: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None

    def count(self, method: str, action: str) -> int:
        """How many calls of `method` went to the machine path ending in `action` ('' = GET)."""
        base = f"/v1/apps/{self.app}/machines/{self.machine}"
        path = f"{base}/{action}" if action else base
        return sum(1 for m, p, _ in self.calls if m == method and p == path)

    async def start(self) -> str:
        app = web.Application(middlewares=[self._auth])
        base = "/v1/apps/{app}/machines/{machine}"
        app.router.add_get(base, self._get)
        app.router.add_post(base + "/start", self._start)
        app.router.add_get(base + "/wait", self._wait)
        app.router.add_post(base + "/stop", self._stop)
        app.router.add_post(base + "/suspend", self._suspend)
        self._runner, port = await serve(app, shutdown_timeout=1.0)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        for task in (self._booting, self._stopping):
            if task is not None:
                task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append((request.method, request.path, dict(request.query)))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        app, machine = request.match_info.get("app"), request.match_info.get("machine")
        if app != self.app or machine != self.machine:
            return web.json_response({"error": "machine not found"}, status=404)
        response: web.StreamResponse = await handler(request)
        return response

    def _machine(self) -> dict[str, Any]:
        return {
            "id": self.machine,
            "name": "ollama-gpu",
            "state": self.state,
            "region": "ord",
            "instance_id": "01HXYZ",
            "private_ip": "fdaa:0:1::2",
            "config": {"image": "ollama/ollama:latest", "guest": {"gpu_kind": "l40s"}},
        }

    async def _get(self, request: web.Request) -> web.Response:
        if self.garbage:
            return web.Response(text="<html>bad gateway</html>", content_type="text/html")
        return web.json_response(self._machine())

    async def _start(self, request: web.Request) -> web.Response:
        previous = self.state
        if previous in ("stopping", "suspending"):
            self.start_refused += 1
            return web.json_response(
                {"error": f"failed_precondition: machine is {previous}"}, status=412
            )
        if previous in ("stopped", "suspended", "created"):
            self.state = "starting"
            self._booting = asyncio.create_task(self._boot())
        return web.json_response({"previous_state": previous, "migrated": False, "new_host": ""})

    async def _boot(self) -> None:
        await asyncio.sleep(self.boot_seconds)
        self.state = "started"
        if self.ollama is not None:
            self.ollama.up = True

    async def _wait(self, request: web.Request) -> web.Response:
        wanted = request.query.get("state", "started")
        self.wait_calls.append(wanted)
        timeout = min(60.0, float(request.query.get("timeout", "60")))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while True:
                    if self.state == wanted:
                        break
                    await asyncio.sleep(0.01)
        if self.state != wanted:
            return web.json_response({"error": "deadline_exceeded"}, status=408)
        return web.json_response({"ok": True})

    def _halt(self, final: str) -> None:
        if self._booting is not None:
            self._booting.cancel()
        if self.ollama is not None:
            self.ollama.up = False
        if self.stop_seconds <= 0:
            self.state = final
            return
        self.state = "stopping" if final == "stopped" else "suspending"
        self._stopping = asyncio.create_task(self._settle(final))

    async def _settle(self, final: str) -> None:
        await asyncio.sleep(self.stop_seconds)
        self.state = final

    async def _stop(self, request: web.Request) -> web.Response:
        self._halt("stopped")
        return web.json_response({"ok": True})

    async def _suspend(self, request: web.Request) -> web.Response:
        self._halt("suspended")
        return web.json_response({"ok": True})
