"""`python -m bot simulate-cost [TRACE]`: what a month of messages costs under each sleep policy.

The trace is replayed against the real BackendPool and BrainRouter (waking, the shared wake,
pre-wake on typing, the idle stop, the session book) on a virtual clock (simtrace.VirtualLoop),
with one simulated GPU machine: it boots in `--boot` seconds once started, loads the model in
`--load` seconds on the first chat, then answers `--reply-tokens` tokens at `--speed` tokens a
second after `--prompt` seconds; a stop takes `--stop` seconds, and the provider bills each
session at least `--billing-minimum` seconds. Idle checks run every second (the default, and
the longest `BACKEND_IDLE_CHECK_INTERVAL` allows). Policies, side by side:

    always on          the machine never sleeps
    idle 1/5/15 min    stopped after a fixed idle time; pre-wake on typing as ours
    ours               `idle_stop: auto` (idle.py: the idle time learned from the gaps, and
                       held while someone types) and pre-wake on typing
    optimum            knowing every message in advance, the cheapest schedule that adds no
                       wait (simfast.optimum)

Billed seconds are what the provider charges (start to stop); busy seconds are when a reply was
being generated; added latency is the wait before the first token beyond a warm machine's.
`--goal` (simgoal.py, chosen by bot/cli.py) prints the goal check as JSON instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

from bot.brains.base import CallStats, ChatRequest, Chunk
from bot.brains.breaker import CircuitBreaker
from bot.brains.idle import AUTO_IDLE_MAX
from bot.brains.pool import Backend, BackendPool
from bot.brains.router import BrainRouter
from bot.brains.sessions import MemorySessions
from bot.brains.simfast import Outcome, optimum
from bot.brains.simtrace import DAY, Machine, Message, VirtualLoop, percentile, trace_from_args

MODEL = "llama3.2:3b"
DAYS_PER_MONTH = 30.4375
CHECK_EVERY = 1.0  # seconds between idle checks: BACKEND_IDLE_CHECK_INTERVAL's default


@dataclass(frozen=True)
class Policy:
    name: str
    idle_stop: float | None  # None: auto
    always_on: bool = False
    prewake: bool = True


POLICIES = (
    Policy("always on", None, always_on=True),
    Policy("idle 1 min", 60.0),
    Policy("idle 5 min", 300.0),
    Policy("idle 15 min", 900.0),
    Policy("ours (auto + pre-wake)", None),
)


@dataclass(frozen=True)
class Result:
    policy: str
    billed: float  # seconds a day
    busy: float
    cold_starts: float  # a day
    latency_p50: float
    latency_p95: float
    usd_month: Decimal
    cold_hit_rate: float = 0.0  # the share of messages that waited for a wake
    latency_p99: float = 0.0

    @property
    def ratio(self) -> float:
        return self.billed / self.busy if self.busy else float("inf")


def result(name: str, out: Outcome, days: float, price: Decimal) -> Result:
    """An outcome over `days` as a day's figures, and the month's dollars."""
    billed = out.billed / days
    return Result(
        name,
        billed,
        out.busy / days,
        out.starts / days,
        percentile(out.waits, 0.5),
        percentile(out.waits, 0.95),
        Decimal(billed * DAYS_PER_MONTH) * price / 3600,
        out.cold_hits / len(out.waits) if out.waits else 0.0,
        percentile(out.waits, 0.99),
    )


def trace_days(trace: list[Message], machine: Machine) -> float:
    return max(1.0, (trace[-1].at + machine.service) / DAY)


class _SimGpu:
    """The simulated machine: a wake driver and an Ollama brain in one."""

    kind = "sim"
    name = "sim-gpu"

    def __init__(self, machine: Machine, always_on: bool) -> None:
        self.m = machine
        self.always_on = always_on
        self.up = always_on
        self.loaded = always_on
        self.busy: list[tuple[float, float]] = []
        self.started = asyncio.Event()

    async def start(self) -> None:
        self.started.set()
        await asyncio.sleep(self.m.boot)
        self.up = True

    async def stop(self) -> None:
        await asyncio.sleep(self.m.stop)
        self.up = self.loaded = False

    async def state(self) -> str:
        return "unknown"  # the pool's reconciliation is not simulated

    def label(self, model: str) -> str:
        return f"{model} on the simulated GPU"

    async def ready(self, model: str) -> bool:
        if not self.up:
            return False
        if not self.loaded:
            await asyncio.sleep(self.m.load)
            self.loaded = True
        return True

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(self.m.prompt)
        yield Chunk("…")
        await asyncio.sleep(self.m.reply_tokens / self.m.speed)
        self.busy.append((started, loop.time()))
        yield Chunk("", CallStats(backend=self.name, model=request.model))

    async def aclose(self) -> None:
        return None


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


async def _idle_job(pool: BackendPool, backend: Backend, gpu: _SimGpu) -> None:
    """The scheduler's idle check on the grid of whole `CHECK_EVERY`s; while the machine is
    asleep nothing can stop, so the clock skips to its next start instead of ticking."""
    loop = asyncio.get_running_loop()
    while True:
        if backend.state == "asleep":
            gpu.started.clear()
            await gpu.started.wait()
        now = loop.time()
        await asyncio.sleep(math.floor(now / CHECK_EVERY + 1) * CHECK_EVERY - now)
        await pool.idle_check()


async def replay(
    trace: list[Message], policy: Policy, machine: Machine, billing_minimum: float = 0.0
) -> Outcome:
    """`trace` through the real pool and router under `policy`, on the running virtual loop."""
    loop = asyncio.get_running_loop()
    gpu = _SimGpu(machine, policy.always_on)
    backend = Backend(
        name=gpu.name,
        brain=gpu,
        driver=gpu,
        idle_stop=policy.idle_stop,
        breaker=CircuitBreaker(clock=loop.time),
    )
    backend.auto.billing_minimum = billing_minimum
    sessions = MemorySessions()
    pool = BackendPool([backend], sessions=sessions, clock=loop.time, poll_interval=0.5)
    router = BrainRouter([], pool)
    request = ChatRequest(MODEL, [{"role": "user", "content": "hi"}], 0.8, 1, 400, 4096)
    waits: list[float] = []

    async def message(msg: Message) -> None:
        if policy.prewake and msg.typing > 0:
            await asyncio.sleep(max(0.0, msg.at - msg.typing - loop.time()))
            await pool.prewake(MODEL)
        if not msg.sent:
            return
        await asyncio.sleep(max(0.0, msg.at - loop.time()))
        answer = await router.open(request)
        waits.append(max(0.0, loop.time() - msg.at - machine.prompt))
        async for _ in answer.chunks():
            pass

    job = None if policy.always_on else asyncio.create_task(_idle_job(pool, backend, gpu))
    await asyncio.gather(*(message(m) for m in trace))
    end = max(trace[-1].at + machine.service, loop.time())
    await asyncio.sleep(max(0.0, end - loop.time()))
    if job is not None:
        for _ in range(int(AUTO_IDLE_MAX / CHECK_EVERY) + 30):  # the last idle tail is billed
            if backend.state == "asleep":
                break
            await asyncio.sleep(CHECK_EVERY)
        job.cancel()
    await pool.aclose()  # books the last session
    if policy.always_on:
        billed = end
    else:
        billed = sum(max(billing_minimum, float(s.seconds)) for s in sessions.sessions)
    return Outcome(billed, _union(gpu.busy), backend.cold_starts, waits)


def run_replay(
    trace: list[Message], policy: Policy, machine: Machine, billing_minimum: float = 0.0
) -> Outcome:
    """`replay` on a fresh virtual clock."""
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(replay(trace, policy, machine, billing_minimum))
    finally:
        loop.close()


def simulate(
    trace: list[Message],
    machine: Machine,
    price: Decimal,
    policies: tuple[Policy, ...] = POLICIES,
    billing_minimum: float = 0.0,
) -> list[Result]:
    """Each policy on its own virtual clock, from the same trace, and the optimum last."""
    days = trace_days(trace, machine)
    results = [
        result(p.name, run_replay(trace, p, machine, billing_minimum), days, price)
        for p in policies
    ]
    best = optimum(trace, machine, billing_minimum)
    return [*results, result("optimum (no added wait)", best, days, price)]


def table(results: list[Result]) -> str:
    head = (
        f"{'policy':<24}{'billed s/day':>13}{'busy s/day':>11}{'billed/busy':>12}"
        f"{'cold/day':>9}{'+p50 s':>8}{'+p95 s':>8}{'$/month':>9}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.policy:<24}{r.billed:>13.0f}{r.busy:>11.0f}{r.ratio:>12.2f}"
            f"{r.cold_starts:>9.1f}{r.latency_p50:>8.2f}{r.latency_p95:>8.2f}"
            f"{r.usd_month:>9.2f}"
        )
    return "\n".join(rows)


def simulate_cli(args: argparse.Namespace) -> int:
    logging.getLogger("bot.brains").setLevel(logging.ERROR)  # thousands of wakes and stops
    trace, source = trace_from_args(args)
    machine = Machine(args.boot, args.load, args.speed, args.reply_tokens, args.prompt, args.stop)
    sent = sum(1 for m in trace if m.sent)
    sys.stdout.write(
        f"trace: {source} ({sent} messages, {len(trace) - sent} typed and never sent)\n"
        f"machine: ${args.price}/GPU-hour, cold start {machine.boot:g}+{machine.load:g} s, "
        f"stop {machine.stop:g} s, billing minimum {args.billing_minimum:g} s, "
        f"{machine.reply_tokens} tokens at {machine.speed:g}/s "
        f"({machine.service:.2f} s a reply)\n\n"
    )
    results = simulate(trace, machine, args.price, billing_minimum=args.billing_minimum)
    sys.stdout.write(table(results) + "\n")
    return 0
