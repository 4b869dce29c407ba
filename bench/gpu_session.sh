#!/usr/bin/env bash
# One whole GPU measurement in one call of the device machine (it has no internet: the
# server's wheels travel in .whl/). Stages are picked by name: bash bench/gpu_session.sh tests api serve
# (speed, formats and b64 are the rows of docs/PERFORMANCE.md's speed table; on two GPUs, run
# one list per GPU with CUDA_VISIBLE_DEVICES after one call with no stage has installed).
# Everything lands in $OUT (logs and JSON rows).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
# Installed once per machine: stages started side by side on two GPUs share /tmp/site.
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && touch /tmp/site/.installed; } || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for stage in "$@"; do
    echo "=== $stage $(date +%T)"
    case "$stage" in
        tests) timeout ${TESTS_TIMEOUT:-330} python3 bench/gpu_quality.py 2>&1 | grep -v "^DEBUG" | tee "$OUT/gpu-tests.log" | tail -40 ;;
        api) timeout 400 python3 -m personaplex.cli.main bench --api --frames 150 --warmup 10 --out "$OUT" 2>&1 | grep -v Warning | tail -20 ;;
        serve) timeout 560 python3 -m personaplex.cli.main bench --serve --clients "${CLIENTS:-1,8,32,64,128,150}" \
                   --duration "${DURATION:-60}" --serve-weights "${SERVE_WEIGHTS:-fp8}" --kv fp8 --client-processes 8 \
                   --out "$OUT" 2>&1 | tail -20 ;;
        frames) timeout 500 python3 -m personaplex.cli.main bench --sessions "${SESSIONS:-1,32}" --weights "${WEIGHTS:-bf16}" \
                   --frames 100 --out "$OUT" 2>&1 | grep -v Warning | tail -30 ;;
        speed)  # issue "Speed II": the compiled graphed frame at B=1 and 32 beside the peer (upstream moshi)
                timeout "${SPEED_TIMEOUT:-330}" python3 -m personaplex.cli.main bench --sessions "${SPEED_SESSIONS:-1,32}" --weights bf16 \
                    --no-eager --frames 100 --out "$OUT/bf16" 2>&1 | grep -v Warning | tail -30 ;;
        tuning)  # the compiler's tuning (TUNING=coordinate-descent or max-autotune), bf16 at TUNING_SESSIONS rows
                timeout "${TUNING_TIMEOUT:-400}" python3 -m personaplex.cli.main bench --sessions "${TUNING_SESSIONS:-1}" --weights bf16 \
                    --no-eager --no-upstream --compile-tuning "${TUNING:-coordinate-descent}" --frames 100 \
                    --out "$OUT/tuning-${TUNING:-coordinate-descent}" 2>&1 | grep -v Warning | tail -8 ;;
        formats)  # fp8 and int4 weights (FORMATS), at FORMAT_SESSIONS rows
                timeout "${FORMATS_TIMEOUT:-300}" python3 -m personaplex.cli.main bench --sessions "${FORMAT_SESSIONS:-1}" \
                    --weights "${FORMATS:-fp8,int4}" --no-eager --no-upstream --frames 100 \
                    --out "$OUT/formats-${FORMAT_SESSIONS:-1}" 2>&1 | grep -v Warning | tail -12 ;;
        depformer-ab)  # one conversation's compiled frame with the depformer's steps fused (the default) and compiled
                timeout "${AB_TIMEOUT:-450}" python3 -m personaplex.cli.main bench --sessions 1 --weights "${AB_WEIGHTS:-fp8}" \
                    --no-eager --no-upstream --depformer-ab --frames 100 --out "$OUT/depformer-ab" 2>&1 \
                    | grep -v Warning | tail -8 ;;
        b64)  # 64 rows, bf16 weights, fp8 KV: early and full context
                timeout "${B64_TIMEOUT:-320}" python3 -m personaplex.cli.main bench --sessions 64 --weights bf16 --kv fp8 \
                    --no-eager --no-upstream --frames 100 --out "$OUT/b64" 2>&1 | grep -v Warning | tail -8 ;;
        linear)  # the linear layers' products in every weight format, with the launch-shape sweep
                BENCH_BUDGET_S="${LINEAR_BUDGET:-270}" timeout "${LINEAR_TIMEOUT:-400}" python3 bench/linear_kernels.py 2>&1 \
                    | grep -v Warning | tail -12 ;;
        gemv)  # the one-row GEMV's launch shapes per weight format (GEMV_KINDS, default FP8,INT4), then a frame's products
                GEMV_KINDS="${GEMV_KINDS:-FP8,INT4}" timeout "${LINEAR_TIMEOUT:-400}" python3 bench/linear_kernels.py --gemv 2>&1 \
                    | grep -v Warning | tail -14 ;;
        dot)  # the several-row kernel's launch shapes at 8, 32 and 64 rows (DOT_KINDS, default INT4,FP8), then a frame's products
                DOT_KINDS="${DOT_KINDS:-INT4,FP8}" timeout "${LINEAR_TIMEOUT:-400}" python3 bench/linear_kernels.py --dot 2>&1 \
                    | grep -v Warning | tail -8 ;;
        gemv-mimi)  # the GEMV's launch shapes for Mimi's transformer products (float32, two rows)
                timeout "${LINEAR_TIMEOUT:-300}" python3 bench/linear_kernels.py --gemv-mimi 2>&1 | grep -v Warning | tail -8 ;;
        gemv-depformer)  # the GEMV's launch shapes for the depformer's products at two rows (bf16; two conversations)
                timeout "${LINEAR_TIMEOUT:-300}" python3 bench/linear_kernels.py --gemv-depformer 2>&1 | grep -v Warning | tail -9 ;;
        ring)  # the ring-attention kernel's launch shapes at the frame's calls (RING_ARGS="--launches quick": four)
                timeout "${RING_TIMEOUT:-400}" python3 bench/ring_attention_sweep.py ${RING_ARGS:-} 2>&1 | grep -v Warning | tail -12 ;;
        mma)  # the int4 tensor-core kernel's launch shapes (MMA_ARGS, e.g. "--quick --shapes depformer --rows 8,64")
                timeout "${MMA_TIMEOUT:-400}" python3 bench/int4_mma.py ${MMA_ARGS:---quick} 2>&1 | grep -v Warning | tail -16 ;;
        profile) timeout "${PROFILE_TIMEOUT:-400}" python3 bench/profile_frame.py --out "$OUT" --rows "${ROWS:-1,32}" --weights "${PROFILE_WEIGHTS:-bf16}" \
                     --cases "${CASES:-readable,as-written,compiled}" ${PROFILE_ARGS:-} 2>&1 | grep -v Warning | cut -c1-2000 | tail -8 ;;
        *) echo "unknown stage $stage" ;;
    esac
done
echo "=== done $(date +%T)"
