"""Server metrics in the Prometheus text exposition format (version 0.0.4), for GET /metrics.

A few metrics with fixed labels do not need a client library: this module keeps them
and writes the text format itself. Updates come from the event loop and from worker
threads, so each metric guards its values with a lock.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

LabelValues = tuple[str, ...]


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def _label_text(self, values: LabelValues, extra: str = "") -> str:
        pairs = [f'{name}="{_escape(value)}"' for name, value in zip(self.label_names, values, strict=True)]
        if extra:
            pairs.append(extra)
        return "{" + ",".join(pairs) + "}" if pairs else ""

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[LabelValues, float] = {} if label_names else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{self._label_text(k)} {_number(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        self._bounds = sorted(buckets)
        self._bucket_counts = [0] * len(self._bounds)
        self._count = 0
        self._sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            index = bisect.bisect_left(self._bounds, value)
            if index < len(self._bounds):
                self._bucket_counts[index] += 1
            self._count += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def render(self) -> list[str]:
        with self._lock:
            counts, total, total_sum = list(self._bucket_counts), self._count, self._sum
        lines = self.header()
        cumulative = 0
        for bound, count in zip(self._bounds, counts, strict=True):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {total}')
        lines.append(f"{self.name}_sum {_number(total_sum)}")
        lines.append(f"{self.name}_count {total}")
        return lines


class ServerMetrics:
    """Everything GET /metrics reports."""

    def __init__(self) -> None:
        self.sessions_active = Gauge("personaplex_sessions_active", "Conversations running now.", ["mode"])
        self.sessions_total = Counter("personaplex_sessions_total", "Conversations started.", ["mode"])
        self.sessions_rejected = Counter(
            "personaplex_sessions_rejected_total",
            "Conversations refused (busy, loading, unauthorised, bad settings).",
            ["reason"],
        )
        # 80 ms is the real-time budget of one frame: buckets crowd around it.
        self.frame_seconds = Histogram(
            "personaplex_frame_seconds",
            "Compute time of one generated 80 ms frame.",
            [0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5],
        )
        self.dropped_frames = Counter(
            "personaplex_dropped_frames_total",
            "Microphone frames dropped because inference fell behind real time.",
        )
        self.protocol_errors = Counter(
            "personaplex_protocol_errors_total", "Malformed client messages answered with an error."
        )
        self.session_crashes = Counter(
            "personaplex_session_errors_total", "Conversations ended by an unexpected error."
        )
        self.model_ready = Gauge("personaplex_model_ready", "1 once the model is loaded and warmed up.")
        for mode in ("turn", "duplex"):
            self.sessions_active.set(0, mode=mode)
            self.sessions_total.inc(0, mode=mode)

    def render(self) -> str:
        metrics = (
            self.sessions_active,
            self.sessions_total,
            self.sessions_rejected,
            self.frame_seconds,
            self.dropped_frames,
            self.protocol_errors,
            self.session_crashes,
            self.model_ready,
        )
        return "\n".join(line for metric in metrics for line in metric.render()) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
