"""`personaplex serve --replicas 2` on a local Ray cluster (CPU, tiny model): conversations
spread over the replicas, "busy" only when both are full, /api/status lists the replicas,
and a replica killed mid-conversation ends that conversation with a 0x05 message; the same
behind Ray Serve's HAProxy ingress, where that conversation just drops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="needs the cluster extra: pip install 'personaplex[cluster]'")

from personaplex.cli.main import main  # noqa: E402
from tests.server.harness import ChatClient, LoopbackUrls, get_json, get_text, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240


@dataclass
class ClusterServer(LoopbackUrls):
    port: int
    log: Path
    haproxy_stats_port: int | None = None  # with --ingress haproxy: HAProxy's statistics page

    def status(self) -> dict[str, Any]:
        return get_json(self.http_url + "/api/status")

    def ready_replicas(self) -> list[dict[str, Any]]:
        return [replica for replica in self.status()["replicas"] if replica["state"] == "ready"]

    def haproxy_servers_up(self) -> int:
        """Replicas HAProxy sends requests to (its statistics: one CSV row per server; Ray
        adds its own proxy as a backup server, which is not counted)."""
        rows = [line.split(",") for line in
                get_text(f"http://127.0.0.1:{self.haproxy_stats_port}/stats;csv").splitlines()]
        header = [column.lstrip("# ") for column in rows[0]]
        name, status = header.index("svname"), header.index("status")
        return sum(1 for row in rows[1:]
                   if len(row) > status and row[name].startswith("SERVE_REPLICA") and row[status].startswith("UP"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(request, tiny_folder, tmp_path_factory) -> Iterator[ClusterServer]:
    """`personaplex serve --replicas 2 --max-sessions 1 --ingress INGRESS` in a subprocess (its
    own Ray); tests choose INGRESS by indirect parametrization, so that the two clusters run
    one after the other."""
    port = _free_port()
    log = tmp_path_factory.mktemp("cluster") / "serve.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    stats_port = _free_port() if request.param == "haproxy" else None
    if stats_port is not None:
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(stats_port)
    command = [
        sys.executable, "-m", "personaplex.cli.main", "serve",
        "--replicas", "2", "--max-sessions", "1", "--ingress", request.param,
        "--model", str(tiny_folder), "--device", "cpu", "--asr-model", "none",
        "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = ClusterServer(port, log, stats_port)
    try:
        wait_until(lambda: _replicas_ready(server, process), timeout=START_TIMEOUT_S, interval=1.0)
        yield server
    except TimeoutError:
        pytest.fail(f"the cluster did not start; its log ends:\n{log.read_text()[-4000:]}")
    finally:
        # Removes the application and stops its Ray (HAProxy's replicas drain for 30 s first).
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _replicas_ready(server: ClusterServer, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"serve exited ({process.returncode}):\n{server.log.read_text()[-4000:]}")
    try:
        # Behind HAProxy a replica serves once its model is loaded, and joins HAProxy's
        # servers a moment after it says so.
        return len(server.ready_replicas()) == 2 and (
            server.haproxy_stats_port is None or server.haproxy_servers_up() == 2)
    except OSError:  # the proxy is not listening yet
        return False


def _sessions_by_replica(server: ClusterServer) -> dict[str, int]:
    return {replica["id"]: replica["sessions"] for replica in server.status()["replicas"]}


def _talk(client: ChatClient) -> None:
    """Handshake, then one microphone frame answered by one generated frame."""
    client.wait_for(lambda got: got.handshakes == 1, timeout=60)
    client.send_pcm(np.zeros(1920 * 2, dtype=np.float32))
    client.wait_for(lambda got: len(got.events_of("frame")) >= 1, timeout=60)


@pytest.mark.slow  # the cluster: a Ray instance and two model loads, about a minute on 2 cores
@pytest.mark.parametrize("cluster", ["proxy"], indirect=True)
def test_two_conversations_go_to_two_replicas_and_a_third_is_busy(cluster):
    status = cluster.status()
    assert len(status["replicas"]) == 2 and status["max_sessions"] == 2
    assert all(replica["free_slots"] == 1 and replica["device"] == "cpu" for replica in status["replicas"])

    first = ChatClient(cluster.ws_url, mode="duplex", seed=1)
    second = ChatClient(cluster.ws_url, mode="duplex", seed=2)
    _talk(first)
    _talk(second)
    wait_until(lambda: sorted(_sessions_by_replica(cluster).values()) == [1, 1], timeout=10)
    assert len(cluster.status()["sessions"]) == 2

    third = ChatClient(cluster.ws_url, mode="duplex", seed=3)
    third.drain(10)
    assert third.closed and third.connection.close_code == 1013
    assert len(third.received.errors) == 1 and third.received.errors[0].startswith("busy")
    assert third.received.handshakes == 0

    metrics = get_text(cluster.http_url + "/metrics")  # both replicas' figures added up
    assert 'personaplex_sessions_active{mode="duplex"} 2.0' in metrics
    assert 'personaplex_sessions_total{mode="duplex"} 2.0' in metrics

    first.close()
    second.close()
    wait_until(lambda: sorted(_sessions_by_replica(cluster).values()) == [0, 0], timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["proxy"], indirect=True)
def test_a_killed_replica_ends_its_conversation_and_the_other_takes_the_next(cluster):
    doomed_client = ChatClient(cluster.ws_url, mode="duplex", seed=4)
    _talk(doomed_client)
    wait_until(lambda: sorted(_sessions_by_replica(cluster).values()) == [0, 1], timeout=10)
    replicas = cluster.status()["replicas"]
    doomed = next(replica for replica in replicas if replica["sessions"] == 1)
    survivor = next(replica for replica in replicas if replica["sessions"] == 0)

    os.kill(doomed["pid"], signal.SIGKILL)
    doomed_client.drain(15)
    assert doomed_client.closed and doomed_client.connection.close_code == 1011
    assert len(doomed_client.received.errors) == 1
    assert "stopped" in doomed_client.received.errors[0]

    after = ChatClient(cluster.ws_url, mode="duplex", seed=5)
    _talk(after)
    wait_until(lambda: _sessions_by_replica(cluster).get(survivor["id"]) == 1, timeout=10)
    after.close()

    # Ray Serve replaces the dead replica (a new id), ready once its model is loaded.
    def replaced() -> bool:
        ready = {replica["id"] for replica in cluster.ready_replicas()}
        return len(ready) == 2 and doomed["id"] not in ready

    wait_until(replaced, timeout=START_TIMEOUT_S, interval=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["haproxy"], indirect=True)
def test_haproxy_ingress_spreads_conversations_and_a_killed_replica_drops_its_own(cluster):
    """HAProxy (leastconn) instead of SessionSlotRouter; a dead replica's conversation ends
    with a bare drop (1006): ConversationEndNotice lives in the Python proxy it bypasses.
    Its replacement joins HAProxy's servers once it has loaded the model."""
    assert get_text(cluster.http_url + "/").startswith("<!doctype html>")
    first = ChatClient(cluster.ws_url, mode="duplex", seed=1)
    second = ChatClient(cluster.ws_url, mode="duplex", seed=2)
    _talk(first)
    _talk(second)
    wait_until(lambda: sorted(_sessions_by_replica(cluster).values()) == [1, 1], timeout=10)
    third = ChatClient(cluster.ws_url, mode="duplex", seed=3)
    third.drain(10)
    assert third.closed and third.connection.close_code == 1013
    assert third.received.errors[0].startswith("busy")
    second.close()
    wait_until(lambda: sorted(_sessions_by_replica(cluster).values()) == [0, 1], timeout=10)

    doomed = next(replica for replica in cluster.status()["replicas"] if replica["sessions"] == 1)
    os.kill(doomed["pid"], signal.SIGKILL)
    first.drain(15)
    assert first.closed and first.connection.close_code == 1006
    assert first.received.errors == []

    after = ChatClient(cluster.ws_url, mode="duplex", seed=4)
    _talk(after)
    after.close()
    # Ray Serve replaces the dead replica; HAProxy sends it conversations once it has loaded.
    wait_until(lambda: len(cluster.ready_replicas()) == 2 and cluster.haproxy_servers_up() == 2, timeout=120)


def test_serve_without_replicas_does_not_import_ray():
    """The cluster extra is optional: one process serves without Ray installed."""
    script = (
        "import sys, argparse\n"
        "from unittest import mock\n"
        "from personaplex.cli import serve\n"
        "parser = argparse.ArgumentParser(); serve.register(parser.add_subparsers())\n"
        "assert parser.parse_args(['serve', '--replicas', '2']).replicas == 2\n"
        "with mock.patch('uvicorn.run'):\n"
        "    serve.run(parser.parse_args(['serve', '--asr-model', 'none']))\n"
        "print('ray' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--replicas", "2", "--min-replicas", "1"], "needs both --min-replicas and --max-replicas"),
        (["--replicas", "4", "--min-replicas", "1", "--max-replicas", "3"], "<= --max-replicas"),
        (["--min-replicas", "0", "--max-replicas", "3"], "1 <= --min-replicas"),
        (["--replicas", "1", "--ray-address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
    ],
)
def test_bad_replica_counts_get_one_line(flags, message, capsys):
    assert main(["serve", "--asr-model", "none", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def _report(replica_id: str, state: str, sessions: int, limit: int, frames: dict) -> dict:
    from personaplex.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.sessions_active.labels(mode="duplex").set(sessions)
    metrics.frame_seconds.observe(0.05)
    metrics.dropped_frames.inc(sessions)
    status = {
        "state": state, "stage": "ready" if state == "ready" else "load",
        "fraction": 1.0 if state == "ready" else 0.4, "message": state, "elapsed_s": 1.0,
        "timings": {}, "error": None, "help": None, "asr": {"model": None, "state": "off", "error": None},
        "sessions": [
            {"id": i + 1, "mode": "duplex", "voice": "NATM0", "seconds": 1.0} for i in range(sessions)
        ],
        "max_sessions": limit, "frames": frames,
    }  # fmt: skip
    return {"id": replica_id, "node": "10.0.0.1", "device": "GPU 0", "pid": 1, "status": status,
            "metrics": metrics.render()}  # fmt: skip


def test_status_of_several_replicas_speaks_for_the_most_advanced_one():
    from personaplex.server.cluster import cluster_status

    frames_b = {"frames_run": 90, "late_frames": 2, "live_rows": 3, "capacity": 4, "frame_ms_median": 30.0,
                "frame_ms_p99": 70.0}  # fmt: skip
    frames_c = {"frames_run": 10, "late_frames": 1, "live_rows": 1, "capacity": 4, "frame_ms_median": 20.0,
                "frame_ms_p99": 90.0}  # fmt: skip
    status = cluster_status(
        [
            _report("a", "loading", 0, 4, {}),
            _report("b", "ready", 3, 4, frames_b),
            _report("c", "ready", 1, 4, frames_c),
        ]
    )
    assert (status.state, status.stage) == ("ready", "ready")
    assert (status.max_sessions, len(status.sessions)) == (12, 4)
    assert [(r.id, r.state, r.sessions, r.free_slots) for r in status.replicas] == [
        ("a", "loading", 0, 4),
        ("b", "ready", 3, 1),
        ("c", "ready", 1, 3),
    ]
    assert status.frames == {"frames_run": 100, "late_frames": 3, "live_rows": 4, "capacity": 8,
                             "frame_ms_median": 30.0, "frame_ms_p99": 90.0}  # fmt: skip


def test_metrics_of_several_replicas_add_up_to_one_process_series():
    from prometheus_client.parser import text_string_to_metric_families

    from personaplex.server.cluster import summed_metrics

    text = summed_metrics([_report("a", "ready", 2, 4, {}), _report("b", "ready", 1, 4, {})])
    assert text.count("# TYPE personaplex_frame_seconds histogram") == 1
    # What a client of one process reads (e.g. the load generator's drop count) reads the same.
    assert "personaplex_dropped_frames_total 3.0\n" in text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    active = {s.labels["mode"]: s.value for s in families["personaplex_sessions_active"].samples}
    assert active == {"duplex": 3.0, "turn": 0.0}
    counts = [s.value for s in families["personaplex_frame_seconds"].samples if s.name.endswith("_count")]
    assert counts == [2.0]


def test_serve_failing_to_start_is_named_in_one_line():
    from personaplex.server.cluster import _failure_line

    haproxy = RuntimeError(
        "HAProxy crashed during startup: [NOTICE] (30055) : haproxy version is 2.8.25\n"
        "[ALERT] (30055) : Binding [haproxy.cfg:45] for frontend prometheus: cannot bind socket "
        "(Address already in use) for [0.0.0.0:9101]\n[ALERT] (30055) : Some protocols failed to start. Exiting.")
    assert _failure_line(haproxy).endswith("cannot bind socket (Address already in use) for [0.0.0.0:9101]")
    assert _failure_line(RuntimeError("first\nValueError: the cause\n")) == "ValueError: the cause"
    assert _failure_line(RuntimeError("")) == "RuntimeError"
