"""The bot's side of the local model's worker process: start it, watch it, replace it.

`WorkerProcess` starts `python -P bot/brains/local_worker.py` (see it for the protocol)
the first time it is needed, sends it one request at a time and hands back its answers. When
the worker dies (a signal, an exit, out of memory) or says nothing for `timeout` seconds (a
hang, then it is killed), the request in flight fails with `ModelUnavailable`, whose text names
the cause for the log, the failure is counted through `on_failure` (for /metrics), and the next
request starts a fresh worker. Closing a request's stream early sends "stop": the worker ends
the generation at its next token, and the answer's tail is read and dropped before the next
request goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from bot.errors import ModelUnavailable

log = logging.getLogger(__name__)

OnFailure = Callable[[str, str], None]  # (worker, cause) → count it
# Run by path, not with -m: `bot.brains`'s __init__ would import the router, Ollama and httpx
# into the worker for nothing (0.3 s of every start). -P keeps bot/brains/ off sys.path.
DEFAULT_COMMAND = (sys.executable, "-P", str(Path(__file__).with_name("local_worker.py")))
_STOP_GRACE = 5.0  # seconds a stopped generation has to say "done" before it is killed
_SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|KEY|DATABASE_URL", re.IGNORECASE)
_LINE_LIMIT = 64 * 1024 * 1024  # an embedding answer is one long line
_HINTS = {
    "SIGILL": "rebuild llama-cpp-python with portable flags (deploy/llama-wheel.sh, "
    "see docs/backends.md)",
    "SIGKILL": "killed from outside, often by the kernel when memory ran out",
}


def _child_env() -> dict[str, str]:
    """Our environment without its secrets (the worker needs none), and with this copy of `bot`
    first on the path, so that the worker runs the same code as the bot."""
    env = {k: v for k, v in os.environ.items() if not _SECRET.search(k)}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _is_last(message: dict[str, Any]) -> bool:
    """A request's last answer: "done" (chat), "vectors" (embed) or "error"."""
    return any(key in message for key in ("done", "vectors", "error"))


def exit_cause(returncode: int | None) -> str:
    """`SIGILL`, `exit 3`: the short cause, for the metric's label."""
    if returncode is None:
        return "hang"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


def describe_exit(returncode: int | None) -> str:
    """How the worker ended, in words for the log and the doctor."""
    cause = exit_cause(returncode)
    if cause.startswith("SIG"):
        hint = _HINTS.get(cause)
        return f"killed by {cause}: {hint}" if hint else f"killed by {cause}"
    if cause == "hang":
        return "it stopped answering and was killed"
    return f"it exited ({cause})"


class WorkerProcess:
    """One llama.cpp worker process (chat or embeddings) and the one request it serves."""

    def __init__(
        self,
        kind: str,
        load: dict[str, Any],
        *,
        command: Sequence[str] | None = None,
        timeout: float = 60.0,
        on_failure: OnFailure | None = None,
    ) -> None:
        self.kind = kind
        self._load = {"op": "load", "kind": kind, **load}
        self._command = list(command or DEFAULT_COMMAND)
        self._timeout = timeout
        self._on_failure = on_failure
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: deque[str] = deque(maxlen=20)
        self._watch: asyncio.Task[None] | None = None
        self._retired: set[int] = set()  # pids whose end was expected or already reported
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.load_ms: float | None = None
        self.stopped: dict[str, Any] | None = None  # the last stopped request's "done"
        self.started = 0  # workers started so far (1 + restarts)

    @property
    def pid(self) -> int | None:
        """The running worker's process id, if one is running."""
        alive = self._proc is not None and self._proc.returncode is None
        return self._proc.pid if alive and self._proc is not None else None

    async def request(self, payload: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """The worker's answers to one request, until its last ("done", "vectors", "error").
        One request at a time; a second caller waits for the first to finish."""
        async with self._lock:
            proc = await self._running()
            ident = next(self._ids)
            finished = False
            try:
                await self._send(proc, {**payload, "id": ident})
                while True:
                    message = await self._read(proc)
                    if message.get("id") != ident:
                        continue  # the tail of an earlier, stopped request
                    last = _is_last(message)
                    finished = last
                    yield message
                    if last:
                        return
            finally:
                if not finished:
                    await self._stop(proc, ident)

    async def _running(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc
        self.started += 1
        started = time.perf_counter()
        self._stderr.clear()
        proc = await asyncio.create_subprocess_exec(
            *self._command,
            env=_child_env(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT,
        )
        self._proc = proc
        self._watch = asyncio.create_task(self._watching(proc))
        log.info("started local %s worker (pid %d)", self.kind, proc.pid)
        await self._send(proc, self._load)
        message = await self._read(proc)
        if "ready" not in message:
            await self._kill(proc)
            reason = str(message.get("failed", "it answered something else"))
            self._failed("load", f"could not load the model: {reason}")
        self.load_ms = (time.perf_counter() - started) * 1000
        log.info("local %s worker ready in %.0f ms", self.kind, self.load_ms)
        return proc

    async def _send(self, proc: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            await self._died(proc)

    async def _read(self, proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self._timeout)
        except ValueError:  # a line longer than the limit
            await self._kill(proc)
            self._failed("protocol", "it wrote a line longer than the limit")
        except TimeoutError:
            await self._kill(proc)
            self._failed("hang", f"no answer for {self._timeout:g}s; the worker was killed")
        if not line:
            await self._died(proc)
        try:
            message = json.loads(line)
        except ValueError:
            await self._kill(proc)
            self._failed("protocol", "it wrote something that is not a JSON line")
        if not isinstance(message, dict):
            await self._kill(proc)
            self._failed("protocol", "it wrote something that is not a JSON object")
        return message

    async def _died(self, proc: asyncio.subprocess.Process) -> NoReturn:
        self._retired.add(proc.pid)
        code = await proc.wait()
        if self._watch is not None:
            await self._watch  # the last words on stderr, for the log
        self._failed(exit_cause(code), describe_exit(code))

    def _failed(self, cause: str, reason: str) -> NoReturn:
        tail = " | ".join(self._stderr)
        log.error("local %s worker failed: %s%s", self.kind, reason, f" [{tail}]" if tail else "")
        if self._on_failure is not None:
            self._on_failure(self.kind, cause)
        raise ModelUnavailable(f"local {self.kind} worker: {reason}")

    async def _stop(self, proc: asyncio.subprocess.Process, ident: int) -> None:
        """End request `ident` early: ask, read its tail, or kill the worker if it will not."""
        if proc.returncode is not None:
            self._unseen_death(proc, "between two pieces of a reply")
            return
        with contextlib.suppress(ModelUnavailable, TimeoutError):
            await self._send(proc, {"op": "stop", "id": ident})
            async with asyncio.timeout(_STOP_GRACE):
                while True:
                    message = await self._read(proc)
                    if message.get("id") == ident and _is_last(message):
                        self.stopped = message.get("done")
                        log.info("local %s worker stopped early: %s", self.kind, self.stopped)
                        return
        if proc.returncode is None:
            log.warning("local %s worker did not stop; killing it", self.kind)
            await self._kill(proc)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        self._retired.add(proc.pid)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()

    async def _watching(self, proc: asyncio.subprocess.Process) -> None:
        """Keep the worker's stderr for the log; report a death nobody else saw (while idle)."""
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._stderr.append(line[:300])
                log.debug("local %s worker: %s", self.kind, line)
        await proc.wait()
        if not self._lock.locked():  # a request in flight reports the death itself
            self._unseen_death(proc, "while idle")

    def _unseen_death(self, proc: asyncio.subprocess.Process, when: str) -> None:
        if proc.pid in self._retired:
            return
        self._retired.add(proc.pid)
        log.error("local %s worker died %s: %s", self.kind, when, describe_exit(proc.returncode))
        if self._on_failure is not None:
            self._on_failure(self.kind, exit_cause(proc.returncode))

    async def aclose(self) -> None:
        """Stop the worker: end of stdin asks it to exit; it is killed if it does not."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._retired.add(proc.pid)
        if proc.returncode is None and proc.stdin is not None:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), _STOP_GRACE)
            except TimeoutError:
                await self._kill(proc)
        if self._watch is not None:
            await self._watch
