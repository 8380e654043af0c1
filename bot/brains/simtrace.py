"""Message traces for the cost simulator, and the virtual clock it runs them on.

A trace is one message per line: the time it was sent (seconds as a number, or an ISO 8601
timestamp), optionally followed by how many seconds the author was typing before, and the word
`unsent` for typing that stopped without a message (a comma or spaces between). Lines starting
with `#` are ignored. Without a file, `community_trace()`
makes a community's days: quiet nights, busy evenings, and conversations that come in bursts.

`VirtualLoop` is an asyncio event loop whose clock jumps straight to the next timer instead of
waiting, so the real pool code (its sleeps, time-outs and tasks) runs a month in seconds.
"""

from __future__ import annotations

import asyncio
import math
import random
import selectors
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from bot.errors import ConfigError

# Relative message rate by hour of the day: quiet nights, a lunch bump, busy evenings.
HOURLY = (
    0.35, 0.2, 0.1, 0.06, 0.05, 0.06, 0.15, 0.35, 0.6, 0.75, 0.85, 0.95,
    1.1, 1.0, 0.95, 1.0, 1.1, 1.3, 1.6, 1.9, 2.0, 1.8, 1.3, 0.7,
)  # fmt: skip
DAY = 86_400.0


@dataclass(frozen=True)
class Message:
    at: float  # seconds from the start of the trace
    typing: float = 0.0  # seconds the author was typing before sending
    sent: bool = True  # False: typing that never became a message


@dataclass(frozen=True)
class Machine:
    boot: float = 8.0
    load: float = 4.0
    speed: float = 150.0
    reply_tokens: int = 60
    prompt: float = 0.1
    stop: float = 3.0  # seconds a stop takes (billed)

    @property
    def service(self) -> float:
        return self.prompt + self.reply_tokens / self.speed


def load_trace(path: Path) -> list[Message]:
    """Read a trace file; times become seconds from its first message."""
    raw: list[tuple[float, float, bool]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.replace(",", " ").split()
        try:
            at = _seconds(fields[0])
            typing = float(fields[1]) if len(fields) > 1 else 0.0
            sent = fields[2:] != ["unsent"]
            if (fields[2:] and sent) or typing < 0:
                raise ValueError(text)
        except ValueError:
            raise ConfigError(
                f"{path}:{number}: expected a time, an optional typing time and `unsent`"
            ) from None
        raw.append((at, typing, sent))
    if not raw:
        raise ConfigError(f"{path}: no messages")
    raw.sort()
    start = raw[0][0]
    return [Message(at - start, typing, sent) for at, typing, sent in raw]


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def community_trace(
    *,
    days: int = 30,
    per_day: int = 1000,
    burst_mean: float = 15.0,
    gap_mean: float = 25.0,
    seed: int = 1,
    unsent: float = 0.1,
) -> list[Message]:
    """A community's days: bursts (conversations) of about `burst_mean` messages `gap_mean`
    seconds apart on average, started more often in the evening than at night. After a
    fraction `unsent` of the messages someone starts typing and never sends (a second random
    stream, so the messages sent are the same whatever `unsent` is)."""
    rng, ghosts = random.Random(seed), random.Random(seed + 7919)
    total = days * per_day
    messages: list[Message] = []
    weights = list(HOURLY)
    sent = 0
    while sent < total:
        day = rng.randrange(days)
        hour = rng.choices(range(24), weights)[0]
        at = day * DAY + hour * 3600 + rng.uniform(0, 3600)
        length = max(1, round(rng.expovariate(1 / burst_mean)))
        for _ in range(min(length, total - sent)):
            messages.append(Message(at, typing=rng.uniform(3.0, 15.0)))
            sent += 1
            if ghosts.random() < unsent:
                messages.append(_ghost(ghosts, at))
            at += rng.expovariate(1 / gap_mean)
    messages.sort(key=lambda m: m.at)
    return messages


def _ghost(rng: random.Random, after: float) -> Message:
    """Typing that stops without a message, some time after the message at `after`."""
    typing = rng.uniform(3.0, 15.0)
    return Message(after + rng.uniform(1.0, 60.0) + typing, typing=typing, sent=False)


def adversarial_trace(
    *, days: int = 30, per_day: int = 500, restart: float = 15.0, seed: int = 2
) -> list[Message]:
    """The ski-rental worst case: gaps close to what a restart costs (`restart` seconds:
    boot, load and stop), in runs of 25 messages spread over the day, and short typing."""
    rng = random.Random(seed)
    messages: list[Message] = []
    runs = max(1, per_day // 25)
    for day in range(days):
        for run in range(runs):
            at = day * DAY + (run + rng.uniform(0.0, 0.8)) * DAY / runs
            for i in range(25):  # typing starts 0.7-1.3 restarts after the last message
                typing = rng.uniform(1.0, 5.0)
                at += (typing + restart * rng.uniform(0.7, 1.3)) if i else 0.0
                messages.append(Message(at, typing=typing))
    messages.sort(key=lambda m: m.at)
    return messages


def percentile(values: Iterable[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


class _VirtualSelector(selectors.SelectSelector):
    """Never blocks: a wait for `timeout` seconds moves the virtual clock instead."""

    def __init__(self, loop: VirtualLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("the simulation is stuck: nothing is scheduled")
        self._loop.now += max(0.0, timeout)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock; only for code that does no real I/O."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self.now


def add_simulate_parser(sub: Any) -> None:
    p = sub.add_parser("simulate-cost", help="replay a message trace against the sleep policies")
    p.add_argument("trace", nargs="?", type=Path, help="default: a generated community month")
    p.add_argument("--goal", action="store_true", help="check the cost goals; print JSON")
    p.add_argument(
        "--trace",
        dest="traces",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="--goal: also replay this trace (repeatable)",
    )
    p.add_argument("--days", type=int, default=30, help="generated trace: days")
    p.add_argument("--per-day", type=int, default=1000, help="generated trace: messages a day")
    p.add_argument("--seed", type=int, default=1, help="generated trace: random seed")
    p.add_argument("--burst", type=float, default=15.0, help="generated: messages a burst (mean)")
    p.add_argument("--gap", type=float, default=25.0, help="generated: seconds between (mean)")
    p.add_argument(
        "--unsent",
        type=float,
        default=0.1,
        help="generated: typing that never becomes a message, per message sent",
    )
    p.add_argument("--price", type=Decimal, default=Decimal("0.70"), help="$ per GPU-hour")
    p.add_argument("--boot", type=float, default=Machine.boot, help="seconds to start")
    p.add_argument("--load", type=float, default=Machine.load, help="seconds to load the model")
    p.add_argument("--stop", type=float, default=Machine.stop, help="seconds a stop takes")
    p.add_argument(
        "--billing-minimum",
        type=float,
        default=0.0,
        help="seconds a provider bills a session at least",
    )
    p.add_argument("--speed", type=float, default=Machine.speed, help="tokens a second")
    p.add_argument("--reply-tokens", type=int, default=Machine.reply_tokens)
    p.add_argument("--prompt", type=float, default=Machine.prompt, help="seconds to first token")
    _add_goal_arguments(p)


def _add_goal_arguments(p: Any) -> None:
    p.add_argument("--prompt-tokens", type=int, default=1500, help="--goal: tokens a prompt")
    p.add_argument(
        "--usd-in",
        type=Decimal,
        default=None,
        help="--goal: per-token API, $ per million prompt tokens (default: the first configured"
        " kind: openai backend's cost, else 0.05)",
    )
    p.add_argument(
        "--usd-out",
        type=Decimal,
        default=None,
        help="--goal: per-token API, $ per million reply tokens (default: as --usd-in, else 0.08)",
    )
    p.add_argument(
        "--home-watts",
        type=Decimal,
        default=Decimal(60),
        help="--goal: home GPU box, watts while idle (it never sleeps)",
    )
    p.add_argument(
        "--home-busy-watts",
        type=Decimal,
        default=Decimal(300),
        help="--goal: home GPU box, watts while answering",
    )
    p.add_argument(
        "--usd-per-kwh", type=Decimal, default=Decimal("0.30"), help="--goal: home electricity"
    )


def trace_from_args(args: Any) -> tuple[list[Message], str]:
    """The positional trace file, or a generated month from the generator's options."""
    if args.trace is not None:
        return load_trace(args.trace), str(args.trace)
    trace = community_trace(
        days=args.days,
        per_day=args.per_day,
        burst_mean=args.burst,
        gap_mean=args.gap,
        seed=args.seed,
        unsent=args.unsent,
    )
    source = (
        f"generated: {args.days} days x {args.per_day} messages in bursts of"
        f" {args.burst:g} messages {args.gap:g} s apart (means), seed {args.seed}"
    )
    return trace, source
