"""`python -m bot simulate-cost [TRACE]`: what a month of messages costs under each sleep policy.

The trace is replayed against the real BackendPool and BrainRouter (waking, the shared wake,
pre-wake on typing, the idle stop, the session book) on a virtual clock (simtrace.VirtualLoop),
with one simulated GPU machine: it boots in `--boot` seconds once started, loads the model in
`--load` seconds on the first chat, then answers `--reply-tokens` tokens at `--speed` tokens a
second after `--prompt` seconds. Policies, side by side:

    always on          the machine never sleeps
    idle 1/5/15 min    stopped after a fixed idle time; woken by the message that needs it
    ours               `idle_stop: auto` (the ski-rental rule, pool.py) and pre-wake on typing

Billed seconds are what the provider charges (start to stop); busy seconds are when a reply was
being generated; added latency is the wait before the first token beyond a warm machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

from bot.brains.base import CallStats, ChatRequest, Chunk
from bot.brains.breaker import CircuitBreaker
from bot.brains.pool import AUTO_IDLE_MAX, Backend, BackendPool
from bot.brains.router import BrainRouter
from bot.brains.sessions import MemorySessions
from bot.brains.simtrace import (
    DAY,
    Machine,
    Message,
    VirtualLoop,
    community_trace,
    load_trace,
    percentile,
)

MODEL = "llama3.2:3b"
DAYS_PER_MONTH = 30.4375
CHECK_EVERY = 10.0  # seconds between idle checks: BACKEND_IDLE_CHECK_INTERVAL's default


@dataclass(frozen=True)
class Policy:
    name: str
    idle_stop: float | None  # None: auto
    always_on: bool = False
    prewake: bool = False


POLICIES = (
    Policy("always on", None, always_on=True),
    Policy("idle 1 min", 60.0),
    Policy("idle 5 min", 300.0),
    Policy("idle 15 min", 900.0),
    Policy("ours (auto + pre-wake)", None, prewake=True),
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

    @property
    def ratio(self) -> float:
        return self.billed / self.busy if self.busy else float("inf")


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

    async def start(self) -> None:
        await asyncio.sleep(self.m.boot)
        self.up = True

    async def stop(self) -> None:
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


async def _replay(trace: list[Message], policy: Policy, machine: Machine, price: Decimal) -> Result:
    loop = asyncio.get_running_loop()
    gpu = _SimGpu(machine, policy.always_on)
    backend = Backend(
        name=gpu.name,
        brain=gpu,
        driver=gpu,
        usd_per_second=price / 3600,
        idle_stop=policy.idle_stop,
        breaker=CircuitBreaker(clock=loop.time),
    )
    sessions = MemorySessions()
    pool = BackendPool([backend], sessions=sessions, clock=loop.time, poll_interval=0.5)
    router = BrainRouter([], pool)
    request = ChatRequest(MODEL, [{"role": "user", "content": "hi"}], 0.8, 1, 400, 4096)
    latencies: list[float] = []

    async def message(msg: Message) -> None:
        if policy.prewake and msg.typing > 0:
            await asyncio.sleep(max(0.0, msg.at - msg.typing - loop.time()))
            await pool.prewake(MODEL)
        await asyncio.sleep(max(0.0, msg.at - loop.time()))
        answer = await router.open(request)
        latencies.append(max(0.0, loop.time() - msg.at - machine.prompt))
        async for _ in answer.chunks():
            pass

    async def idle_job() -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY)
            await pool.idle_check()

    job = None if policy.always_on else asyncio.create_task(idle_job())
    await asyncio.gather(*(message(m) for m in trace))
    end = max(trace[-1].at + machine.service, loop.time())
    await asyncio.sleep(max(0.0, end - loop.time()))
    if job is not None:
        for _ in range(int(AUTO_IDLE_MAX / CHECK_EVERY) + 2):  # the last idle tail is billed too
            if backend.state == "asleep":
                break
            await asyncio.sleep(CHECK_EVERY)
        job.cancel()
    await pool.aclose()  # books the last session
    days = max(1.0, end / DAY)
    billed = end if policy.always_on else float(sum(s.seconds for s in sessions.sessions))
    return Result(
        policy.name,
        billed / days,
        _union(gpu.busy) / days,
        backend.cold_starts / days,
        percentile(latencies, 0.5),
        percentile(latencies, 0.95),
        Decimal(billed / days * DAYS_PER_MONTH) * price / 3600,
    )


def hindsight(trace: list[Message], machine: Machine, price: Decimal) -> Result:
    """The bound no online policy beats: knowing every message in advance, the machine is up
    exactly while busy, and each idle gap costs min(gap, a cold start) (stay up, or restart)."""
    cold = machine.boot + machine.load
    busy = _union([(m.at, m.at + machine.service) for m in trace])
    billed, starts, end = cold + busy, 1, float("-inf")
    for m in trace:
        if end != float("-inf") and m.at > end:
            billed += min(m.at - end, cold)
            starts += m.at - end > cold
        end = max(end, m.at + machine.service)
    days = max(1.0, end / DAY)
    usd = Decimal(billed / days * DAYS_PER_MONTH) * price / 3600
    return Result("hindsight best (bound)", billed / days, busy / days, starts / days, 0, 0, usd)


def simulate(
    trace: list[Message], machine: Machine, price: Decimal, policies: tuple[Policy, ...] = POLICIES
) -> list[Result]:
    """Each policy on its own virtual clock, from the same trace."""
    results = []
    for policy in policies:
        loop = VirtualLoop()
        try:
            results.append(loop.run_until_complete(_replay(trace, policy, machine, price)))
        finally:
            loop.close()
    return results


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
    if args.trace is not None:
        trace = load_trace(args.trace)
        source = str(args.trace)
    else:
        trace = community_trace(
            days=args.days,
            per_day=args.per_day,
            burst_mean=args.burst,
            gap_mean=args.gap,
            seed=args.seed,
        )
        source = (
            f"generated: {args.days} days x {args.per_day} messages in bursts of"
            f" {args.burst:g} messages {args.gap:g} s apart (means), seed {args.seed}"
        )
    machine = Machine(args.boot, args.load, args.speed, args.reply_tokens, args.prompt)
    sys.stdout.write(
        f"trace: {source} ({len(trace)} messages)\n"
        f"machine: ${args.price}/GPU-hour, cold start {machine.boot:g}+{machine.load:g} s, "
        f"{machine.reply_tokens} tokens at {machine.speed:g}/s "
        f"({machine.service:.2f} s a reply)\n\n"
    )
    results = [*simulate(trace, machine, args.price), hindsight(trace, machine, args.price)]
    sys.stdout.write(table(results) + "\n")
    return 0
