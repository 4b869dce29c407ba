#!/usr/bin/env bash
# The two-GPU measurement of docs/SCALING.md ("The two-GPU measurement") on the device
# machine, which has no internet and takes at most 64 MiB of files a call: Ray's wheel
# (79 MB) and its ray[serve] requirements travel in two halves, over two calls made while
# the machine stays warm (files outside the work tree, /tmp/raystash, persist between them).
#
#   call 1: bash bench/gpu_cluster.sh stash   carry [.whl, .whl-ray1]  (parks half the wheels)
#   call 2: bash bench/gpu_cluster.sh run     carry [.whl-ray2]        (the measurement)
#   (`install` alone: reassemble, install and check the imports, no server)
#
# `run` installs the wheels into /tmp/site, starts `personaplex serve --replicas 2` (Ray Serve,
# one replica per GPU), waits until /api/status lists both replicas ready, runs
# `personaplex bench --serve --url` against it while sampling the Ray proxy's and replicas'
# CPU, then stops the server. Results in $OUT: h200x2/<card>-serving.json, status.json,
# cpu.log, serve.log, bench.log; raylogs/serve-logs.txt on failure (8 files at most come back).
# Knobs (env): SESSIONS (per replica, 150), CLIENTS (32,64,128), DURATION (30),
# READY_TIMEOUT (300), PORT (8998), INGRESS (proxy | haproxy: `serve --ingress`), SERVE_MODEL_ARGS,
# PY (python3), SKIP_INSTALL=1 (local test),
# RAYSTASH, SITE.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out/cluster}
STASH=${RAYSTASH:-/tmp/raystash}
SITE=${SITE:-/tmp/site}
PY=${PY:-python3}
PORT=${PORT:-8998}
BUDGET_S=560  # the whole command, install to shutdown (the call's limit is 600 s)
mkdir -p "$OUT"
# NVLink multicast stays off on the shared host (KINDS.md); Ray workers inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# No usage reports from an offline machine; no Ray OOM killer (the VM's MemTotal starts at
# ~31 GiB and grows as memory is used, KINDS.md, so Ray's 95% threshold would be misread).
export RAY_USAGE_STATS_ENABLED=0 RAY_memory_monitor_refresh_ms=0

stage() { echo "=== $* ($(date +%T), ${SECONDS}s)"; }
left() { echo $((BUDGET_S - SECONDS)); }

stash() {
    stage "stash: .whl-ray1 (and .whl) into $STASH"
    ls .whl-ray1/* >/dev/null 2>&1 || { echo "no .whl-ray1 here: carry it"; exit 1; }
    rm -rf "$STASH" && mkdir -p "$STASH/base" || exit 1
    cp -r .whl-ray1/* "$STASH"/ || exit 1
    # .whl normally stays in the work tree for call 2 (ignored paths are kept); a copy in case.
    if ls .whl/*.whl >/dev/null 2>&1; then cp .whl/*.whl "$STASH/base"/ || exit 1; fi
    ls -la "$STASH" "$STASH/base"
    du -sh "$STASH"
    stage "stash done: now call 'bash bench/gpu_cluster.sh run' with carry [.whl-ray2] within 30 s"
}

install() {
    stage "install: reassemble ray, pip install into $SITE"
    ls .whl-ray2/* >/dev/null 2>&1 || { echo "FAIL: no .whl-ray2 here: carry it"; exit 1; }
    local sums wheel
    sums=$(ls "$STASH"/ray.sha256 2>/dev/null) || {
        echo "FAIL: $STASH holds nothing from 'stash': the machine was not kept warm since (or"
        echo "stash never ran). Call 'stash' again, then 'run' at once."
        exit 2
    }
    cp -r .whl-ray2/* "$STASH"/ || exit 1
    wheel="$STASH/$(awk '{print $2}' "$sums")"
    if ! (cd "$STASH" && sha256sum --status -c ray.sha256); then  # not reassembled by an earlier run
        cat "$wheel".part-* >"$wheel" || exit 1
        (cd "$STASH" && sha256sum -c ray.sha256) || { echo "FAIL: the reassembled ray wheel is corrupt"; exit 1; }
    fi
    rm -f "$wheel".part-*
    local base=.whl
    ls .whl/*.whl >/dev/null 2>&1 || base="$STASH/base"
    echo "base wheels from $base"
    # grpcio-reflection 1.85.1 and googleapis-common-protos 1.76 need protobuf >= 7.35.1 and
    # grpcio >= 1.85.1 (their generated code checks): the newer ones from fallback/ if the
    # machine's are older. One pip call for everything, into a fresh folder: a second
    # --target --upgrade call replaces shared top-level folders (google/) wholesale.
    local fallback=()
    if ! "$PY" - <<'EOF'
import sys
from importlib.metadata import version
def v(name): return tuple(int(p) for p in version(name).split(".")[:3] if p.isdigit())
old = [n for n, floor in (("protobuf", (7, 35, 1)), ("grpcio", (1, 85, 1))) if v(n) < floor]
print("machine's protobuf", version("protobuf"), "grpcio", version("grpcio"), "too old:", old or "none")
sys.exit(1 if old else 0)
EOF
    then
        fallback=("$STASH"/fallback/*.whl)
        echo "so these come too: ${fallback[*]##*/}"
    fi
    rm -rf "$SITE"
    timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$base"/*.whl "$STASH"/*.whl "${fallback[@]}" || { echo "FAIL: pip install"; exit 1; }
}

smoke() {
    stage "versions and imports"
    timeout 120 "$PY" - <<'EOF' || { echo "FAIL: the Ray Serve stack does not import"; exit 1; }
from importlib.metadata import PackageNotFoundError, version
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "MISSING"
names = ["ray", "protobuf", "grpcio", "grpcio-reflection", "aiohttp", "fastapi", "starlette", "pydantic",
         "uvicorn", "websockets", "opentelemetry-sdk", "googleapis-common-protos", "psutil", "torch"]
print(" ".join(f"{n}={v(n)}" for n in names))
import ray, ray.serve, ray.serve.request_router, opencensus.stats.stats  # noqa: E401,F401
import google.rpc.status_pb2, grpc_reflection.v1alpha.reflection  # noqa: E401,F401
import personaplex.server.cluster  # noqa: F401
print("ray", ray.__version__, "from", ray.__file__)
EOF
}

cpu_sampler() {  # every 10 s: CPU% of Ray's proxy (or HAProxy), controller and replicas (with their children)
    exec "$PY" - "$1" <<'EOF'
import sys, time, psutil
log = open(sys.argv[1], "a", buffering=1)
watched = {}
while True:
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.pid not in watched and any(k in cmd for k in ("ProxyActor", "ServeReplica", "ServeController", "haproxy")):
            try:
                proc.cpu_percent()
            except psutil.Error:
                continue
            watched[proc.pid] = (cmd.split()[0][:60], proc, {})
    time.sleep(10)
    stamp = time.strftime("%H:%M:%S")
    for pid, (name, proc, kids) in list(watched.items()):
        try:
            own = proc.cpu_percent()
            children = 0.0
            for kid in proc.children(recursive=True):
                kids.setdefault(kid.pid, kid)
                children += kids[kid.pid].cpu_percent()
            log.write(f"{stamp} pid={pid} cpu={own:.0f}% children_cpu={children:.0f}% "
                      f"threads={proc.num_threads()} {name}\n")
        except psutil.Error:
            del watched[pid]
    try:
        import subprocess
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=5).stdout
        for line in gpus.strip().splitlines():
            log.write(f"{stamp} gpu {line}\n")
    except Exception:
        pass
EOF
}

replicas_ready() {  # prints one progress line; exit 0 when /api/status lists 2 ready replicas
    "$PY" - "http://127.0.0.1:$PORT/api/status" <<'EOF'
import json, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
        status = json.load(response)
except Exception as err:
    print(f"not answering yet ({type(err).__name__})"); sys.exit(1)
replicas = status.get("replicas") or []
print(f"state={status.get('state')} stage={status.get('stage')} replicas: " + (", ".join(
    f"{r['device']} {r['state']}/{r['stage']} {r.get('fraction')}" for r in replicas) or "none listed yet"))
sys.exit(0 if len(replicas) == 2 and all(r["state"] == "ready" for r in replicas) else 1)
EOF
}

ray_logs() {
    mkdir -p "$OUT/raylogs"
    local f logs=/tmp/ray/session_latest/logs
    for f in "$logs"/serve/* "$logs"/*.err; do
        [ -s "$f" ] || continue
        echo "##### $f"
        tail -n 200 "$f"
    done >"$OUT/raylogs/serve-logs.txt" 2>&1
    echo "Ray's logs (tails) in $OUT/raylogs/serve-logs.txt"
}

run() {
    [ -n "${SKIP_INSTALL:-}" ] || install
    [ -n "${SKIP_INSTALL:-}" ] || export PYTHONPATH=$SITE:$PWD/src:$PWD
    smoke
    stage "gpus"
    nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"
    if "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/', timeout=2)" 2>/dev/null; then
        echo "FAIL: something already answers on port $PORT (a server left from an earlier call?)"; exit 1
    fi
    stage "serve --replicas 2 --ingress ${INGRESS:-proxy} (max ${SESSIONS:-150} sessions each)"
    # shellcheck disable=SC2086  # SERVE_MODEL_ARGS is a list of flags
    setsid "$PY" -m personaplex.cli.main serve --replicas 2 ${SERVE_MODEL_ARGS:---random-weights --weights fp8 --kv-cache fp8} \
        --max-sessions "${SESSIONS:-150}" --ingress "${INGRESS:-proxy}" --asr-model none --port "$PORT" --log-level warning \
        >"$OUT/serve.log" 2>&1 &
    local server=$! ok=0 sampler="" rc=1
    SERVER_PID=$server
    trap 'kill -TERM "$SERVER_PID" 2>/dev/null' EXIT  # whatever ends this script stops the server
    local ready_by=$((SECONDS + ${READY_TIMEOUT:-300})) next_print=0 line
    while [ $SECONDS -lt $ready_by ] && [ "$(left)" -gt 60 ]; do
        if ! kill -0 $server 2>/dev/null; then echo "FAIL: serve exited"; break; fi
        if line=$(replicas_ready); then echo "ready after ${SECONDS}s: $line"; ok=1; break; fi
        if [ $SECONDS -ge $next_print ]; then echo "  ${SECONDS}s: $line"; next_print=$((SECONDS + 15)); fi
        sleep 3
    done
    if [ $ok = 1 ]; then
        cpu_sampler "$OUT/cpu.log" &
        sampler=$!
        local bench_s=$(( $(left) - 45 ))
        stage "bench --serve: clients ${CLIENTS:-32,64,128}, ${DURATION:-30} s each (at most ${bench_s}s)"
        timeout "$bench_s" "$PY" -m personaplex.cli.main bench --serve --url "http://127.0.0.1:$PORT" \
            --clients "${CLIENTS:-32,64,128}" --duration "${DURATION:-30}" --client-processes "${CLIENT_PROCESSES:-12}" \
            --serve-weights "${SERVE_WEIGHTS:-fp8}" --kv "${KV:-fp8}" --server-timeout 60 \
            --out "$OUT/h200x2" 2>&1 | tee "$OUT/bench.log"
        rc=${PIPESTATUS[0]}
        [ "$rc" = 0 ] || echo "FAIL: bench exited with $rc"
        kill "$sampler" 2>/dev/null
        stage "cpu samples (last 24 lines of $OUT/cpu.log)"
        tail -n 24 "$OUT/cpu.log" 2>/dev/null
    else
        echo "FAIL: the two replicas were not ready within ${READY_TIMEOUT:-300}s"
    fi
    "$PY" -c "import json, urllib.request as u; s = json.load(u.urlopen('http://127.0.0.1:$PORT/api/status', timeout=10)); \
json.dump(s, open('$OUT/status.json', 'w'), indent=1); print('replicas:', [(r['device'], r['state'], r['sessions'], \
r['frames']) for r in s.get('replicas') or []])" 2>&1 | tail -3
    [ "$rc" = 0 ] || { ray_logs; echo "--- serve.log (tail)"; tail -n 40 "$OUT/serve.log"; }
    stage "stopping the server (SIGTERM)"
    kill -TERM $server 2>/dev/null
    local stop_by=$((SECONDS + 40))
    while kill -0 $server 2>/dev/null && [ $SECONDS -lt $stop_by ]; do sleep 1; done
    if kill -0 $server 2>/dev/null; then
        echo "serve did not stop within 40 s: SIGKILL to its process group"
        kill -KILL -- -$server 2>/dev/null
    fi
    wait $server 2>/dev/null
    echo "serve exit code $? (130: stopped by SIGTERM, as meant)"
    trap - EXIT
    ps -eo pid,etime,args | grep -E "[r]aylet|[g]cs_server|[r]ay::" | cut -c1-120 | head -5
    stage "done: rc=$rc"
    return "$rc"
}

case "${1:-}" in
    stash) stash ;;
    run) run ;;
    install) install && export PYTHONPATH=$SITE:$PWD/src:$PWD && smoke ;;
    *) echo "usage: bash bench/gpu_cluster.sh stash|run|install"; exit 2 ;;
esac
