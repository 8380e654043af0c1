"""The cost simulator: the real pool on a virtual clock, the quick sweep, the optimum, the goal."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from decimal import Decimal
from pathlib import Path

import pytest

from bot.brains.idle import AutoIdle
from bot.brains.simfast import Fixed, optimum, replay, sweep
from bot.brains.simgoal import Prices, best_fixed, goal, mixes, token_prices
from bot.brains.simtrace import (
    HOURLY,
    Machine,
    Message,
    VirtualLoop,
    adversarial_trace,
    community_trace,
    load_trace,
)
from bot.brains.simulate import POLICIES, Policy, run_replay, simulate
from bot.brains.spec import parse_backends
from bot.cli import main
from bot.errors import ConfigError

PRICE = Decimal("0.72")  # $ per hour: $0.0002 a second
ONE_SECOND = Machine(boot=8.0, load=4.0, speed=100.0, reply_tokens=50, prompt=0.5, stop=2.0)
PRICES = Prices(
    PRICE, Decimal("0.05"), Decimal("0.08"), 1500, 60, Decimal(60), Decimal(300), Decimal("0.30")
)


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
    path.write_text("# sent, typing\n100, 4\n2026-11-21T10:00:00Z\n40.5\n120 6 unsent\n")
    trace = load_trace(path)
    assert [m.at for m in trace][:3] == [0.0, 59.5, 79.5] and trace[1].typing == 4.0
    assert not trace[2].sent and trace[2].typing == 6.0 and trace[1].sent
    assert trace[-1].at > 1_700_000_000  # the ISO time, in seconds after the first
    path.write_text("10\nnot-a-time\n")
    with pytest.raises(ConfigError, match=r"trace.txt:2"):
        load_trace(path)
    path.write_text("10 3 maybe\n")
    with pytest.raises(ConfigError, match=r"trace.txt:1: .*unsent"):
        load_trace(path)


def test_community_trace_has_quiet_nights_busy_evenings_and_unsent_typing() -> None:
    trace = community_trace(days=5, per_day=400, seed=3)
    sent = [m for m in trace if m.sent]
    assert len(sent) == 2000
    assert 100 < len(trace) - len(sent) < 300, "about one unsent typing per ten messages"
    assert all(a.at <= b.at for a, b in itertools.pairwise(trace))
    hours = [int(m.at % 86_400 // 3600) for m in sent]
    assert hours.count(20) > 5 * hours.count(4)
    assert HOURLY[20] > HOURLY[4]
    assert [m.at for m in community_trace(days=5, per_day=400, seed=3, unsent=0.0)] == [
        m.at for m in sent
    ], "the unsent typing comes from its own random stream"


def test_adversarial_gaps_are_close_to_a_restart() -> None:
    trace = adversarial_trace(days=1, per_day=100, restart=15.0)
    gaps = [b.at - b.typing - a.at for a, b in itertools.pairwise(trace) if b.at - a.at < 100]
    assert len(gaps) == 96 and all(10.5 - 1e-9 <= g <= 19.5 + 1e-9 for g in gaps)


def test_fixed_timeout_prewake_and_optimum_on_a_known_trace() -> None:
    trace = [Message(t, typing=20.0) for t in (100.0, 110.0, 120.0, 5000.0)]
    cold = Policy("idle 1 min, no pre-wake", 60.0, prewake=False)
    idle, ours, best = simulate(trace, ONE_SECOND, PRICE, (cold, POLICIES[-1]))
    assert idle.cold_starts == 2
    assert idle.busy == pytest.approx(3.0)  # the two sent while it woke are answered together
    assert idle.latency_p95 == pytest.approx(12.0)  # the cold start, waited for
    assert idle.cold_hit_rate == 0.75
    # Up 100..183: answered at 112 and 120, idle from 121, stopped by the check at 181, which
    # takes 2 s. Then 5000..5075: woken, answered at 5012, stopped at 5073 + 2.
    assert idle.billed == pytest.approx(83 + 75)
    assert ours.latency_p95 == 0.0, "typing 20 s ahead hides a 12 s cold start"
    assert ours.billed < idle.billed
    # The optimum: up from 88 (ready at 100) to 121 + 2 s of stop, then 4988..5003.
    assert best.billed == pytest.approx(35 + 15) and best.cold_starts == 2
    assert best.billed <= ours.billed
    assert idle.usd_month == Decimal(idle.billed * 30.4375) * PRICE / 3600


def test_billing_minimum() -> None:
    trace = [Message(0.0), Message(100.0)]
    # Apart: two sessions of 15 s, billed 200 each; together: 12 + 100 + 1 + 2 = 115, billed 200.
    assert optimum(trace, ONE_SECOND, billing_minimum=200.0).billed == pytest.approx(200.0)
    assert optimum(trace, ONE_SECOND).billed == pytest.approx(30.0)
    quick = replay(trace, ONE_SECOND, Fixed(0.0), billing_minimum=200.0)
    assert quick.billed == pytest.approx(400.0) and quick.starts == 2
    real = run_replay(trace, Policy("idle 0", 0.0), ONE_SECOND, billing_minimum=200.0)
    assert real.billed == pytest.approx(400.0)


def test_unsent_typing_wakes_the_machine_for_nothing() -> None:
    trace = [Message(100.0, typing=10.0, sent=False)]
    out = run_replay(trace, Policy("idle 30 s", 30.0), ONE_SECOND)
    # Woken at 90, ready at 102, idle 30 s, stopped at the check at 132, 2 s to stop.
    assert out.starts == 1 and out.waits == [] and out.billed == pytest.approx(44.0)
    assert optimum(trace, ONE_SECOND).billed == 0.0


@pytest.mark.parametrize("rule", ["fixed 0", "fixed 30", "auto"])
def test_the_quick_sweep_follows_the_real_pool(rule: str) -> None:
    """simfast.replay writes the pool's rules out by hand; the real pool is the reference."""
    trace = community_trace(days=2, per_day=300) + adversarial_trace(days=2, per_day=100)
    trace.sort(key=lambda m: m.at)
    machine = Machine()
    seconds = None if rule == "auto" else float(rule.split()[1])
    real = run_replay(trace, Policy(rule, seconds), machine)
    quick = replay(trace, machine, AutoIdle() if seconds is None else Fixed(seconds))
    assert real.starts == quick.starts > 10
    assert real.cold_hits == quick.cold_hits
    assert real.busy == pytest.approx(quick.busy, rel=1e-6)
    # The real clock carries float noise into measured wake times, so the learned limits can
    # differ by a hair at a tie; allow 0.1%.
    assert real.billed == pytest.approx(quick.billed, rel=1e-3)


def test_the_sweep_is_the_quick_replay_with_fixed_timeouts() -> None:
    trace = community_trace(days=2, per_day=300) + adversarial_trace(days=1, per_day=100)
    trace.sort(key=lambda m: m.at)
    timeouts = (0.0, 4.5, 17.0, 60.0, 300.0)
    for minimum in (0.0, 60.0):
        swept = sweep(trace, Machine(), timeouts, billing_minimum=minimum)
        for t, out in zip(timeouts, swept, strict=True):
            one = replay(trace, Machine(), Fixed(t), billing_minimum=minimum)
            assert (out.billed, out.busy, out.starts, out.waits) == (
                one.billed,
                one.busy,
                one.starts,
                one.waits,
            ), f"timeout {t}, minimum {minimum}"


def _slow_typists(days: int, seed: int = 5) -> list[Message]:
    """Conversations whose messages take 15-35 s to type: longer than a cold start."""
    rng = random.Random(seed)
    trace: list[Message] = []
    for day in range(days):
        for _ in range(20):
            at = day * 86_400.0 + rng.uniform(0, 86_000)
            for _ in range(rng.randint(3, 20)):
                typing = rng.uniform(15.0, 35.0)
                at += typing + rng.expovariate(1 / 20)
                trace.append(Message(at, typing=typing))
    return sorted(trace, key=lambda m: m.at)


@pytest.mark.parametrize("name", ["slow typists", "community, 150 a day", "adversarial"])
def test_ours_is_not_dearer_than_the_best_fixed_timeout(name: str) -> None:
    """The goal's comparison on generated traces: the cheapest swept fixed timeout (same
    pre-wake, same checks) that makes no larger share of messages wait than ours."""
    machine = Machine()
    trace = {
        "slow typists": lambda: _slow_typists(days=6),
        "community, 150 a day": lambda: community_trace(days=15, per_day=150, seed=3),
        "adversarial": lambda: adversarial_trace(days=4, restart=15.0, seed=4),
    }[name]()
    ours = replay(trace, machine, AutoIdle())
    cold = ours.cold_hits / len(ours.waits)
    timeout, fixed = best_fixed(trace, machine, cold, 0.0)
    assert fixed.cold_hits <= ours.cold_hits
    assert ours.billed <= fixed.billed, f"fixed {timeout} s"
    if name == "slow typists":  # one timeout must cover typing and replies alike; ours learns
        assert ours.billed < 0.95 * fixed.billed  # each context's own (and holds for typing)


def test_always_on_bills_the_whole_span() -> None:
    trace = [Message(0.0), Message(86_400.0 * 2)]
    [always, _] = simulate(trace, Machine(), PRICE, (POLICIES[0],))
    assert always.cold_starts == 0 and always.billed == pytest.approx(86_400, rel=1e-4)


def test_mixes_with_the_issue_defaults() -> None:
    row = {"messages_per_day": 1000.0, "busy_s_per_day": 500.0, "cold_hit_rate": 0.2,
           "usd_per_month": 100.0, "p95_added_s": 9.0}  # fmt: skip
    by_name = {m["mix"]: m for m in mixes(row, PRICES)}
    # 1,000 a day x 30.4375 days x (1,500 x $0.05 + 60 x $0.08) per million tokens.
    assert by_name["per-token API"]["usd_per_month"] == 2.43
    # 60 W all month (43.83 kWh) + 240 W more for 4.23 h (1.01 kWh), at $0.30.
    assert by_name["home GPU (always on)"]["usd_per_month"] == 13.45
    assert by_name["cloud GPU + API while it wakes"]["usd_per_month"] == 100.49


def test_goal_on_short_traces() -> None:
    machine = Machine()
    traces = [
        ("community", community_trace(days=2)),
        ("adversarial", adversarial_trace(days=1, restart=15.0)),
    ]
    report = goal(traces, machine, PRICES)
    community, adversarial = report["traces"]
    assert community["name"] == "community" and adversarial["name"] == "adversarial"
    best = optimum(traces[0][1], machine)
    days = (traces[0][1][-1].at + machine.service) / 86_400
    assert community["optimum_s_per_day"] == pytest.approx(best.billed / days, abs=0.1)
    assert community["billed_vs_optimum"] == pytest.approx(
        community["billed_s_per_day"] / community["optimum_s_per_day"], rel=1e-2
    )
    assert 0 <= community["best_fixed_timeout_s"] <= 300
    assert community["best_fixed_cold_hit_rate"] <= community["cold_hit_rate"]
    if community["billed_vs_best_fixed"] != 1.0:  # rounded to 0.1%: a tie can go either way
        assert community["not_dearer_than_best_fixed"] == (community["billed_vs_best_fixed"] < 1)
    assert report["cheapest_mix"] == "per-token API"
    assert report["cheapest_mix_usd_per_month"] <= 3
    assert report["pass"] == all(report["checks"].values())


def test_cli_prints_every_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate-cost", "--days", "1", "--per-day", "150", "--stop", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("always on", "idle 1 min", "idle 5 min", "idle 15 min", "ours", "optimum"):
        assert name in out
    assert "billed/busy" in out and "$/month" in out and "stop 1 s" in out


def test_cli_goal_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ours.txt"
    path.write_text("".join(f"{t}, 5\n" for t in range(0, 7200, 90)))
    code = main(["simulate-cost", "--goal", "--days", "1", "--trace", str(path)])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["pass"] else 1)
    assert [t["name"] for t in report["traces"]] == ["community", "adversarial", "sparse", "ours"]
    assert set(report) >= {"traces", "cheapest_mix", "cheapest_mix_usd_per_month", "pass"}
    assert report["traces"][3]["messages_per_day"] == 80.0


@pytest.mark.parametrize("minimum", [0.0, 40.0, 300.0])
def test_the_optimum_is_the_cheapest_split_by_brute_force(minimum: float) -> None:
    """Every way of cutting 9 messages into sessions, priced by hand, against the DP."""
    rng = random.Random(int(minimum))
    ats = sorted(rng.uniform(0, 200) for _ in range(9))
    machine = ONE_SECOND  # a session: 12 s before its first message, 1 s reply, 2 s stop
    cheapest = float("inf")
    for cuts in itertools.product([False, True], repeat=len(ats) - 1):
        total, first = 0.0, ats[0]
        for i, cut in enumerate([*cuts, True]):
            if cut:  # a session from first - 12 to ats[i] + 1 + 2
                total += max(minimum, ats[i] + 3 - first + 12)
                first = ats[i + 1] if i + 1 < len(ats) else 0.0
        cheapest = min(cheapest, total)
    trace = [Message(at) for at in ats]
    assert optimum(trace, machine, minimum).billed == pytest.approx(cheapest)


def test_token_prices_come_from_the_command_line_then_the_configured_api_backend() -> None:
    api = parse_backends(
        [
            {"name": "home", "url": "http://127.0.0.1:11434"},
            {
                "name": "api",
                "kind": "openai",
                "url": "http://127.0.0.1:9/v1",
                "api_key_env": "SIM_KEY",
                "cost": {"usd_per_million_input_tokens": 0.2, "usd_per_million_output_tokens": 0.6},
            },
        ],
        "test",
    )
    assert token_prices(None, None, api) == (Decimal("0.2"), Decimal("0.6"), "backend api")
    given = token_prices(Decimal("0.01"), None, api)
    assert given == (Decimal("0.01"), Decimal("0.08"), "the command line")
    assert token_prices(None, None, None) == (Decimal("0.05"), Decimal("0.08"), "the defaults")
    assert token_prices(None, None, api[:1])[2] == "the defaults"
