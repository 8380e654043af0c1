"""The cost simulator: the real pool on a virtual clock, traces, and the CLI."""

from __future__ import annotations

import asyncio
import itertools
from decimal import Decimal
from pathlib import Path

import pytest

from bot.brains.simtrace import HOURLY, Machine, Message, VirtualLoop, community_trace, load_trace
from bot.brains.simulate import POLICIES, Policy, hindsight, simulate
from bot.cli import main
from bot.errors import ConfigError

PRICE = Decimal("0.72")  # $ per hour: $0.0002 a second


def test_virtual_loop_skips_time() -> None:
    loop = VirtualLoop()
    try:

        async def day() -> float:
            await asyncio.sleep(86_400)
            await asyncio.wait_for(asyncio.sleep(5), timeout=10)
            return asyncio.get_running_loop().time()

        assert loop.run_until_complete(day()) == pytest.approx(86_405)
    finally:
        loop.close()


def test_load_trace(tmp_path: Path) -> None:
    path = tmp_path / "trace.txt"
    path.write_text("# sent, typing\n100, 4\n2026-11-21T10:00:00Z\n40.5\n")
    trace = load_trace(path)
    assert [m.at for m in trace][:2] == [0.0, 59.5] and trace[1].typing == 4.0
    assert trace[-1].at > 1_700_000_000  # the ISO time, in seconds after the first
    path.write_text("10\nnot-a-time\n")
    with pytest.raises(ConfigError, match=r"trace.txt:2"):
        load_trace(path)


def test_community_trace_has_quiet_nights_and_busy_evenings() -> None:
    trace = community_trace(days=5, per_day=400, seed=3)
    assert len(trace) == 2000
    assert all(a.at <= b.at for a, b in itertools.pairwise(trace))
    hours = [int(m.at % 86_400 // 3600) for m in trace]
    assert hours.count(20) > 5 * hours.count(4)
    assert HOURLY[20] > HOURLY[4]


def test_fixed_timeout_and_prewake_on_a_known_trace() -> None:
    machine = Machine(boot=8.0, load=4.0, speed=100.0, reply_tokens=50, prompt=0.5)  # 1 s a reply
    trace = [Message(t, typing=20.0) for t in (100.0, 110.0, 120.0, 5000.0)]
    idle, ours = simulate(trace, machine, PRICE, (Policy("idle 1 min", 60.0), POLICIES[-1]))
    assert idle.cold_starts == 2
    assert idle.busy == pytest.approx(3.0)  # the two sent while it woke are answered together
    assert idle.latency_p95 == pytest.approx(12.0)  # the cold start, waited for
    # Up 100..190 (the first check 60 s after the reply ended at 121; checks every 10 s), then
    # 5000..5080 (woken, answered at 5013, stopped at the check 60 s later).
    assert idle.billed == pytest.approx(90 + 80)
    assert ours.latency_p95 == 0.0, "typing 20 s ahead hides a 12 s cold start"
    assert ours.billed < idle.billed
    bound = hindsight(trace, machine, PRICE)
    assert bound.billed == pytest.approx(12 + 4 + 9 + 9 + 12)
    assert bound.billed <= ours.billed
    assert idle.usd_month == Decimal(idle.billed * 30.4375) * PRICE / 3600


def test_always_on_bills_the_whole_span() -> None:
    trace = [Message(0.0), Message(86_400.0 * 2)]
    [always] = simulate(trace, Machine(), PRICE, (POLICIES[0],))
    assert always.cold_starts == 0 and always.billed == pytest.approx(86_400, rel=1e-4)


def test_cli_prints_every_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate-cost", "--days", "1", "--per-day", "150"]) == 0
    out = capsys.readouterr().out
    for name in ("always on", "idle 1 min", "idle 5 min", "idle 15 min", "ours", "hindsight"):
        assert name in out
    assert "billed/busy" in out and "$/month" in out
