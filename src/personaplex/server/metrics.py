"""Server metrics for GET /metrics, kept by prometheus_client in the Prometheus text format.

Each server has its own registry (tests start several in one process). prometheus_client's
metrics are thread-safe, so the event loop and the worker threads update them directly.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# The same series as before prometheus_client kept them: no `*_created` timestamps, which a
# scraper does not need and which summing replicas' metrics (cluster.py) would garble.
disable_created_metrics()


class ServerMetrics:
    """Everything GET /metrics reports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.sessions_active = Gauge(
            "personaplex_sessions_active", "Conversations running now.", ["mode"], registry=registry
        )
        self.sessions_total = Counter(
            "personaplex_sessions_total", "Conversations started.", ["mode"], registry=registry
        )
        self.sessions_rejected = Counter(
            "personaplex_sessions_rejected_total",
            "Conversations refused (busy, loading, unauthorised, bad settings).",
            ["reason"],
            registry=registry,
        )
        # 80 ms is the real-time budget of one frame: buckets crowd around it.
        self.frame_seconds = Histogram(
            "personaplex_frame_seconds",
            "Compute time of one generated 80 ms frame.",
            buckets=[0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5],
            registry=registry,
        )
        self.dropped_frames = Counter(
            "personaplex_dropped_frames_total",
            "Microphone frames dropped because inference fell behind real time.",
            registry=registry,
        )
        self.refused_audio_seconds = Counter(
            "personaplex_refused_audio_seconds_total",
            "Microphone audio refused undecoded because a client sent it faster than real time.",
            registry=registry,
        )
        self.idle_timeouts = Counter(
            "personaplex_idle_timeouts_total",
            "Conversations ended because the client sent nothing.",
            registry=registry,
        )
        self.protocol_errors = Counter(
            "personaplex_protocol_errors_total",
            "Malformed client messages answered with an error.",
            registry=registry,
        )
        self.session_crashes = Counter(
            "personaplex_session_errors_total", "Conversations ended by an unexpected error.", registry=registry
        )
        self.model_ready = Gauge("personaplex_model_ready", "1 once the model is loaded and warmed up.", registry=registry)
        for mode in ("turn", "duplex"):  # both series exist from the start, at 0
            self.sessions_active.labels(mode=mode)
            self.sessions_total.labels(mode=mode)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
