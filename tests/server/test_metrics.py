"""GET /metrics comes from prometheus_client: the same names as before, in a format its own
parser (and so Prometheus) reads."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from personaplex.server.metrics import ServerMetrics


def test_metrics_keep_their_names_and_parse_as_prometheus_text():
    metrics = ServerMetrics()
    metrics.sessions_total.labels(mode="duplex").inc()
    metrics.sessions_active.labels(mode="duplex").inc()
    metrics.sessions_rejected.labels(reason="busy").inc()
    metrics.dropped_frames.inc(2.5)
    metrics.frame_seconds.observe(0.05)
    metrics.model_ready.set(1)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render())
        for sample in family.samples
    }
    assert samples[("personaplex_sessions_total", (("mode", "duplex"),))] == 1
    assert samples[("personaplex_sessions_total", (("mode", "turn"),))] == 0
    assert samples[("personaplex_sessions_active", (("mode", "duplex"),))] == 1
    assert samples[("personaplex_sessions_rejected_total", (("reason", "busy"),))] == 1
    assert samples[("personaplex_dropped_frames_total", ())] == 2.5
    assert samples[("personaplex_frame_seconds_bucket", (("le", "0.06"),))] == 1
    assert samples[("personaplex_frame_seconds_count", ())] == 1
    assert samples[("personaplex_model_ready", ())] == 1
    assert ("personaplex_protocol_errors_total", ()) in samples
    assert ("personaplex_session_errors_total", ()) in samples
    assert not any(name.endswith("_created") for name, _ in samples)  # only the series we keep


def test_each_server_counts_for_itself():
    first, second = ServerMetrics(), ServerMetrics()
    first.protocol_errors.inc()
    assert "personaplex_protocol_errors_total 1.0" in first.render()
    assert "personaplex_protocol_errors_total 0.0" in second.render()
