"""What the process counts itself, in a prometheus-client registry of its own (one per app).

`Metrics` holds the counters and histograms the engine and scheduler count into; `/metrics`
(bot/ops/web.py) serves the registry with `generate_latest`. Figures that other services keep in
Postgres (the ledger, guard verdicts, backend sessions) are not counted twice: a custom collector
(bot/ops/scrape.py) reads them when /metrics is scraped and adds them to the same registry.

The small wrappers keep call sites short (`metrics.replies.inc(platform=..., outcome=...)`) and
let tests read one labelled value back (`value()`, `count()`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as _PromCounter
from prometheus_client import Histogram as _PromHistogram

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

# `*_created` samples double the page for no use here (and the names predate them).
prometheus_client.disable_created_metrics()


def _sample_value(
    registry: CollectorRegistry, name: str, labels: dict[str, str], default: float = 0.0
) -> float:
    found = registry.get_sample_value(name, labels)
    return default if found is None else found


class Counter:
    """A labelled counter: `inc(amount, **labels)`, `value(**labels)`."""

    def __init__(
        self, registry: CollectorRegistry, name: str, help_text: str, labels: Sequence[str] = ()
    ) -> None:
        self.name = name
        self._registry = registry
        self._metric = _PromCounter(name, help_text, tuple(labels), registry=registry)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        target = self._metric.labels(**labels) if labels else self._metric
        target.inc(amount)

    def value(self, **labels: str) -> float:
        sample = self.name if self.name.endswith("_total") else f"{self.name}_total"
        return _sample_value(self._registry, sample, labels)


class Histogram:
    """A labelled histogram: `observe(value, **labels)`, `count(**labels)`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self.name = name
        self._registry = registry
        self._metric = _PromHistogram(
            name, help_text, tuple(labels), registry=registry, buckets=tuple(buckets)
        )

    def observe(self, value: float, **labels: str) -> None:
        target = self._metric.labels(**labels) if labels else self._metric
        target.observe(value)

    def count(self, **labels: str) -> int:
        return int(_sample_value(self._registry, f"{self.name}_count", labels))


class Metrics:
    """The app's registry and what the process counts; names follow Prometheus conventions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.replies = Counter(
            r,
            "personabot_replies_total",
            "Messages answered, by platform and outcome (done, failed, cancelled).",
            ("platform", "outcome"),
        )
        self.reply_seconds = Histogram(
            r,
            "personabot_reply_seconds",
            "Time from a message to the end of its reply.",
            ("platform",),
        )
        self.first_token_seconds = Histogram(
            r,
            "personabot_first_token_seconds",
            "Time from a message to the first piece of its reply.",
            ("platform",),
        )
        self.model_calls = Counter(
            r,
            "personabot_model_calls_total",
            "Model calls by backend and result (ok, error).",
            ("backend", "result"),
        )
        self.local_worker_crashes = Counter(
            r,
            "personabot_local_worker_crashes_total",
            "Local model worker processes lost, by worker (chat, embed) and cause "
            "(SIGILL, SIGKILL, SIGSEGV, exit N, hang, load, protocol).",
            ("worker", "cause"),
        )
        self.scheduled_runs = Counter(
            r,
            "personabot_scheduled_jobs_total",
            "Scheduled job runs by job and result (ok, error, skipped).",
            ("job", "result"),
        )

    def render(self) -> bytes:
        """The registry in Prometheus text format (what /metrics serves)."""
        return prometheus_client.generate_latest(self.registry)


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
