"""`personaplex bench --serve --url`: the load generator against a live server (tiny model)."""

from __future__ import annotations

import json
from argparse import Namespace

from personaplex.server import loadtest


def test_real_time_clients_are_all_answered_and_none_counts_late(start_server, engine, tmp_path, monkeypatch):
    """Two clients for 1.2 s: every frame sent is answered, and a client that has sent its
    last frame hangs up once answered, so none of its frames of silence count as late."""
    monkeypatch.setattr(engine.scheduler, "max_wait_s", 0.5)  # generous: this CPU is shared with other work
    server = start_server(engine)
    late_before = engine.frame_stats()["late_frames"]
    args = Namespace(url=server.http_url, clients="2", duration=1.2, client_processes=1, out=str(tmp_path),
                     serve_weights="bf16", kv="bf16", port=0, server_timeout=60.0)
    assert loadtest.run(args) == 0
    (row,) = json.loads((tmp_path / "cpu-serving.json").read_text())["rows"]
    assert row["sessions"] == 2 and row["client_errors"] == []
    assert row["frames_sent"] == 2 * 15  # 1.2 s of 80 ms frames, each client
    assert row["unanswered_frames"] == 0 and row["ring_dropped_frames"] == 0
    assert row["late_frames"] == engine.frame_stats()["late_frames"] - late_before == 0
    assert row["mic_to_reply_ms_p50"] is not None and row["client_send_lag_ms_p99"] is not None
