"""A small Prometheus registry: counters, gauges and histograms with labels, in text format 0.0.4.

One `Metrics` per app (no global state), handed to the engine and read by `bot/ops/web.py`.
Services that keep their own records in Postgres (the ledger, guard verdicts, wakes) are read at
scrape time instead of being counted twice: `bot/ops/web.py` adds those samples to the page.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Sequence

LabelValues = tuple[str, ...]

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def sample(name: str, labels: dict[str, str], value: float) -> str:
    """One exposition line, `name{a="b"} value`."""
    if labels:
        inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {_number(value)}"
    return f"{name} {_number(value)}"


def header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _labels(self, key: LabelValues) -> dict[str, str]:
        return dict(zip(self.labelnames, key, strict=True))

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        lines = header(self.name, self.kind, self.help)
        for key, value in sorted(self._values.items()):
            lines.append(sample(self.name, self._labels(key), value))
        return lines


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = value


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            counts[-1] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        counts = self._counts.get(self._key(labels))
        return counts[-1] if counts else 0

    def render(self) -> list[str]:
        lines = header(self.name, self.kind, self.help)
        for key, counts in sorted(self._counts.items()):
            labels = self._labels(key)
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                le = "+Inf" if math.isinf(bound) else _number(bound)
                lines.append(sample(f"{self.name}_bucket", {**labels, "le": le}, count))
            lines.append(sample(f"{self.name}_sum", labels, self._sums[key]))
            lines.append(sample(f"{self.name}_count", labels, counts[-1]))
        return lines


class Metrics:
    """What the process counts itself; names follow Prometheus conventions (`_total`)."""

    def __init__(self) -> None:
        self.replies = Counter(
            "personabot_replies_total",
            "Messages answered, by platform and outcome (done, failed, cancelled).",
            ("platform", "outcome"),
        )
        self.reply_seconds = Histogram(
            "personabot_reply_seconds",
            "Time from a message to the end of its reply.",
            ("platform",),
        )
        self.first_token_seconds = Histogram(
            "personabot_first_token_seconds",
            "Time from a message to the first piece of its reply.",
            ("platform",),
        )
        self.model_calls = Counter(
            "personabot_model_calls_total",
            "Model calls by backend and result (ok, error).",
            ("backend", "result"),
        )
        self.local_worker_crashes = Counter(
            "personabot_local_worker_crashes_total",
            "Local model worker processes lost, by worker (chat, embed) and cause "
            "(SIGILL, SIGKILL, SIGSEGV, exit N, hang, load, protocol).",
            ("worker", "cause"),
        )
        self.scheduled_runs = Counter(
            "personabot_scheduled_jobs_total",
            "Scheduled job runs by job and result (ok, error, skipped).",
            ("job", "result"),
        )

    def all(self) -> list[_Metric]:
        return [m for m in vars(self).values() if isinstance(m, _Metric)]

    def render(self) -> list[str]:
        lines: list[str] = []
        for metric in self.all():
            lines.extend(metric.render())
        return lines


class ReplyTimer:
    """Counts one reply's outcome and latency (first piece, whole reply) for /metrics."""

    def __init__(self, metrics: Metrics, platform: str) -> None:
        self._metrics = metrics
        self._platform = platform
        self._started = time.perf_counter()
        self._first = False
        self.outcome = "cancelled"

    def first_piece(self) -> None:
        """The first piece of reply text was shown (once per reply)."""
        if not self._first:
            self._first = True
            elapsed = time.perf_counter() - self._started
            self._metrics.first_token_seconds.observe(elapsed, platform=self._platform)

    def finish(self) -> None:
        elapsed = time.perf_counter() - self._started
        self._metrics.replies.inc(platform=self._platform, outcome=self.outcome)
        if self.outcome == "done":
            self._metrics.reply_seconds.observe(elapsed, platform=self._platform)
