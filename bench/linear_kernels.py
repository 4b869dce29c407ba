"""GPU micro-benchmark of the LM's linear layers in every weight format, plus full-size checks.

Run on the GPU machine: `PYTHONPATH=src python3 bench/linear_kernels.py` (writes JSON to $OUT);
`... bench/linear_kernels.py --frame-linears LABEL` times only part 2's frame products (quick).

Part 1, per layer shape and batch M in {1, 8, 32, 64}: bf16 cuBLAS (F.linear); fp8 through
`torch._scaled_mm` (activation quantized per row, M padded to 16) and through our Triton
weight-only kernel; int4 through torch's tinygemm (`_weight_int4pack_mm`) and through our
Triton kernel over a sweep of launch shapes; int8 through our Triton kernel. Each product is
timed inside a CUDA graph over enough weight copies that they do not fit in L2 (each layer's
weights are read once per frame in the model too), median of several replays. Reported:
microseconds, GB/s of weight bytes, relative error against float32 math on the same x.

`--gemv` instead sweeps the one-row kernel alone (fp8 and int4 at every quantized shape a frame
runs, loads pipelined or not; GEMV_KINDS=PLAIN: bf16 weights beside cuBLAS), then times the
frame's products with the fastest shapes found;
`--gemv-mimi` the same for Mimi's transformer products (float32, two rows);
`--gemv-depformer` for the depformer's products as two conversations run them (bf16, two rows:
frames of two rows compile the depformer's steps instead of fusing them);
`--dot` the same for the several-row kernel at 8, 32 and 64 rows (int4; DOT_KINDS=INT4,FP8 adds fp8),
its ~130 kernels compiled first in worker processes.

Part 2, the full 7B LM with random weights: weights in GPU memory per format (and the peak
while quantizing in place), text/audio logit error and greedy-token agreement against bf16,
and the time of only the linear layers of one frame (temporal + text head + 8 depformer
steps) in one CUDA graph at B in {1, 8, 32, 64}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from graph_timing import graph_time_us  # bench/, the script's folder

from personaplex.model.config import LMConfig
from personaplex.model.kernels import quantized_matmul as qmm
from personaplex.model.kernels.quantized_matmul import KernelConfig, WeightKind, quantized_linear
from personaplex.model.lm import LMModel
from personaplex.model.quantize import Fp8Linear, Int4Linear, dequantize_affine, quantize_affine, quantize_model

TEMPORAL_SHAPES = [(12288, 4096), (4096, 4096), (22528, 4096), (4096, 11264)]  # (N out, K in)
DEPFORMER_SHAPES = [(1024, 4096), (3072, 1024), (1024, 1024), (5632, 1024), (1024, 2816)]
BATCHES = [1, 8, 32, 64]
GROUP_SIZE = 64
L2_FLUSH_BYTES = 160 * 2**20  # more weight bytes per timing than the H100's 50 MB L2
TIME_BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "270"))
START = time.perf_counter()
OUT_DIR = Path(os.environ.get("OUT", "bench/results"))
RESULTS: dict[str, object] = {}


def elapsed() -> float:
    return time.perf_counter() - START


def save() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    label = RESULTS.get("label")
    (OUT_DIR / f"linear_kernels{'-' + label if label else ''}.json").write_text(json.dumps(RESULTS, indent=1))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def copies_for(weight_bytes: int) -> int:
    return max(2, min(256, -(-L2_FLUSH_BYTES // weight_bytes)))


# --------------------------------------------------------------------------- format wrappers


def tinygemm_pack(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, inner_k_tiles: int = 8):
    """Our affine int4 (w = q*s + b) in tinygemm's layout: w = (q - 8) * s + zero, zero = b + 8s."""
    packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, 0::2] << 4 | codes[:, 1::2]).contiguous(), inner_k_tiles)
    zeros = biases.float() + 8 * scales.float()
    scales_and_zeros = torch.stack([scales.float(), zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros


def scaled_mm_linear(x: torch.Tensor, w_fp8_t: torch.Tensor, w_scale_row: torch.Tensor) -> torch.Tensor:
    """fp8 x fp8 on the tensor cores: x quantized per row; M padded to the kernel's multiple of 16."""
    m = x.shape[0]
    pad = (-m) % 16
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    x_scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
    x_fp8 = (x / x_scale).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x_fp8, w_fp8_t, scale_a=x_scale, scale_b=w_scale_row, out_dtype=torch.bfloat16)
    return out[:m]


def sweep_configs(m: int, kind: WeightKind) -> list[KernelConfig]:
    bm = 1 if m == 1 else (16 if m <= 16 else (32 if m <= 32 else 64))
    # One row also tries the tensor-core kernel with the row padded to 16: the ring attention
    # ran 1.7x faster that way than on the CUDA cores (run G), as its loads get pipelined.
    padded_row = [KernelConfig(16, bn, bk, sk) for bn in (32, 64) for bk in (128, 256) for sk in (1, 2)] if m == 1 else []
    if kind == WeightKind.FP8:  # already near the memory bound in the first run: a smaller sweep
        widths = (16, 32) if m == 1 else (32, 64)
        return [KernelConfig(bm, bn, bk, sk) for bn in widths for bk in (256, 512) for sk in (1, 2)] + padded_row
    if m == 1:
        gemv = [KernelConfig(1, bn, bk, sk) for bn in (16, 32, 64) for bk in (128, 256, 512) for sk in (1, 2, 4)]
        return gemv + padded_row
    return [KernelConfig(bm, bn, bk, sk) for bn in (32, 64, 128) for bk in (128, 256) for sk in (1, 2, 4)]


TUNED: dict[tuple[int, int, int, int], KernelConfig] = {}  # (kind, m, n, k) -> fastest config seen


def sweep(kind: WeightKind, m: int, n: int, k: int, x: torch.Tensor, weights: list, chunk: int,
          reference: torch.Tensor) -> dict[str, object]:
    """Time every launch shape of `sweep_configs`; remember the fastest correct one."""
    seen, trials = set(), []
    for config in sweep_configs(m, kind):
        config = qmm.fit_config(config, kind, k, chunk)
        if config in seen:
            continue
        seen.add(config)
        w = weights[0]
        err = rel_err(quantized_linear(x, w[0], w[1], w[2], kind, chunk, config), reference)
        us = graph_time_us([lambda w=w: quantized_linear(x, w[0], w[1], w[2], kind, chunk, config) for w in weights], 7)
        trials.append({"config": asdict(config), "us": us, "kernel_err": err})
    best = min((t for t in trials if t["kernel_err"] < 1e-2), key=lambda t: t["us"])
    TUNED[(int(kind), m, n, k)] = KernelConfig(**best["config"])
    return {"best": best, "trials": trials}


def tuned_config(kind: WeightKind, m: int, n: int, k: int) -> KernelConfig:
    return TUNED.get((int(kind), m, n, k)) or DEFAULT_CONFIG(kind, m, n, k)


DEFAULT_CONFIG = qmm.default_config


def bench_shape(n: int, k: int, m: int, do_sweep: bool) -> dict[str, object]:
    row: dict[str, object] = {"n": n, "k": k, "m": m}
    torch.manual_seed(n + k + m)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w.float().t()

    # bf16 cuBLAS
    copies = copies_for(n * k * 2)
    ws = [w.clone() for _ in range(copies)]
    row["bf16_us"] = graph_time_us([lambda wi=wi: F.linear(x, wi) for wi in ws])
    row["bf16_err"] = rel_err(F.linear(x, w), ref)
    row["bf16_GBps"] = n * k * 2 / row["bf16_us"] / 1e3
    del ws

    # fp8: per-row weight scales, two kernels
    fp8 = Fp8Linear.from_weight(w)
    w_scale, w_fp8 = fp8.scales, fp8.weight_fp8
    fp8_bytes = n * k + n * 4
    copies = copies_for(fp8_bytes)
    w8s = [w_fp8.clone() for _ in range(copies)]
    scale_row = w_scale[None, :].contiguous()
    row["fp8_scaled_mm_us"] = graph_time_us([lambda wi=wi: scaled_mm_linear(x, wi.t(), scale_row) for wi in w8s])
    row["fp8_scaled_mm_err"] = rel_err(scaled_mm_linear(x, w_fp8.t(), scale_row), ref)
    row["fp8_triton_us"] = graph_time_us(
        [lambda wi=wi: quantized_linear(x, wi, w_scale, None, WeightKind.FP8, 1) for wi in w8s])
    row["fp8_triton_err"] = rel_err(quantized_linear(x, w_fp8, w_scale, None, WeightKind.FP8, 1), ref)
    if do_sweep and n * k >= 4096 * 4096 and elapsed() < TIME_BUDGET_S * 0.5:
        fp8_sweep = sweep(WeightKind.FP8, m, n, k, x, [(wi, w_scale, None) for wi in w8s], 1,
                          x.float() @ (w_fp8.float() * w_scale[:, None]).t())
        row["fp8_triton_best"] = fp8_sweep["best"]
    row["fp8_GB"] = fp8_bytes / 1e9
    del w8s

    # int4 affine, group 64
    packed, scales, biases = quantize_affine(w, 4, GROUP_SIZE)
    deq_ref = x.float() @ dequantize_affine(packed, scales, biases, 4, GROUP_SIZE, torch.float32).t()
    int4_bytes = packed.numel() + scales.numel() * 4
    row["int4_GB"] = int4_bytes / 1e9
    row["int4_quant_err"] = rel_err(deq_ref, ref)  # error of the format itself
    copies = copies_for(int4_bytes)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    try:
        tg = [tinygemm_pack(codes, scales, biases) for _ in range(copies)]
        row["int4_tinygemm_us"] = graph_time_us(
            [lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p[0], GROUP_SIZE, p[1]) for p in tg])
        row["int4_tinygemm_kernel_err"] = rel_err(torch.ops.aten._weight_int4pack_mm(x, tg[0][0], GROUP_SIZE, tg[0][1]), deq_ref)
        del tg
    except RuntimeError as exc:
        row["int4_tinygemm_error"] = str(exc)[:200]
    q4 = [(packed.clone(), scales.clone(), biases.clone()) for _ in range(copies)]
    default = qmm.default_config(WeightKind.INT4, m, n, k)
    row["int4_triton_default"] = asdict(qmm.fit_config(default, WeightKind.INT4, k, GROUP_SIZE))
    row["int4_triton_us"] = graph_time_us(
        [lambda q=q: quantized_linear(x, q[0], q[1], q[2], WeightKind.INT4, GROUP_SIZE) for q in q4])
    row["int4_triton_kernel_err"] = rel_err(quantized_linear(x, packed, scales, biases, WeightKind.INT4, GROUP_SIZE), deq_ref)
    if do_sweep and elapsed() < TIME_BUDGET_S * 0.5:
        int4_sweep = sweep(WeightKind.INT4, m, n, k, x, q4, GROUP_SIZE, deq_ref)
        row["int4_triton_best"] = int4_sweep["best"]
        row["int4_triton_sweep"] = int4_sweep["trials"]
    del q4
    row["int4_GBps_triton"] = int4_bytes / row["int4_triton_us"] / 1e3

    # int8 affine, group 64, default launch shape only
    p8, s8, b8 = quantize_affine(w, 8, GROUP_SIZE)
    deq8 = x.float() @ dequantize_affine(p8, s8, b8, 8, GROUP_SIZE, torch.float32).t()
    int8_bytes = p8.numel() + s8.numel() * 4
    copies = copies_for(int8_bytes)
    q8 = [(p8.clone(), s8.clone(), b8.clone()) for _ in range(copies)]
    row["int8_triton_us"] = graph_time_us(
        [lambda q=q: quantized_linear(x, q[0], q[1], q[2], WeightKind.INT8, GROUP_SIZE) for q in q8])
    row["int8_triton_kernel_err"] = rel_err(quantized_linear(x, p8, s8, b8, WeightKind.INT8, GROUP_SIZE), deq8)
    row["int8_quant_err"] = rel_err(deq8, ref)
    return row


def odd_shape_errors() -> dict[str, float]:
    """Kernel error against the dequantized weights where N is not a multiple of the block (masked rows)."""
    errors = {}
    for n in (40, 200):
        for m in (1, 3, 17, 64):
            x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, 1024, device="cuda") * 0.03
            for bits, kind in ((4, WeightKind.INT4), (8, WeightKind.INT8)):
                p, sc, b = quantize_affine(w, bits, GROUP_SIZE)
                ref = x.float() @ dequantize_affine(p, sc, b, bits, GROUP_SIZE, torch.float32).t()
                errors[f"int{bits}_n{n}_m{m}"] = rel_err(quantized_linear(x, p, sc, b, kind, GROUP_SIZE), ref)
            scale = w.abs().amax(1) / 448.0
            w8 = (w / scale[:, None]).to(torch.float8_e4m3fn)
            ref = x.float() @ (w8.float() * scale[:, None]).t()
            errors[f"fp8_n{n}_m{m}"] = rel_err(quantized_linear(x, w8, scale, None, WeightKind.FP8, 1), ref)
    return errors


# --------------------------------------------------------------------------- full model


def frame_linears(model: LMModel, agent_steps: int = 8) -> list[tuple[torch.nn.Module, int]]:
    """(layer, input size) of every linear product one frame runs, in order."""
    calls = []
    for layer in model.transformer.layers:
        for mod in (layer.self_attn.in_proj, layer.self_attn.out_proj, layer.gating.linear_in, layer.gating.linear_out):
            calls.append(mod)
    calls.append(model.text_linear)
    for k in range(agent_steps):
        calls.append(model.depformer_in[k])
        for layer in model.depformer.layers:
            calls += [layer.self_attn.in_projs[k], layer.self_attn.out_projs[k],
                      layer.gating[k].linear_in, layer.gating[k].linear_out]
        calls.append(model.linears[k])
    return [(mod, mod.in_features) for mod in calls]


def time_frame_linears(model: LMModel, batch: int) -> float:
    calls = frame_linears(model)
    inputs = {k: torch.randn(batch, k, device="cuda", dtype=torch.bfloat16) for k in {k for _, k in calls}}
    return graph_time_us([lambda: [mod(inputs[k]) for mod, k in calls]], replays=20) / 1000


def random_lm(seed: int = 0) -> LMModel:
    torch.manual_seed(seed)
    return LMModel(LMConfig(), device="cuda", dtype=torch.bfloat16).eval().requires_grad_(False)


def model_checks() -> None:
    config = LMConfig()
    torch.manual_seed(123)
    frames = 12
    codes = torch.randint(0, config.card, (1, config.num_codebooks, frames), device="cuda")
    codes[:, 0] = torch.randint(0, config.text_card, (1, frames), device="cuda")
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    RESULTS["allocated_before_model_GB"] = baseline / 1e9
    model = random_lm()
    with torch.no_grad():
        text_ref, audio_ref = (t.float() for t in model(codes))
    RESULTS["model_bf16_GB"] = torch.cuda.memory_allocated() / 1e9
    RESULTS["frame_linears_ms"] = {"bf16": {b: time_frame_linears(model, b) for b in BATCHES}}
    save()
    for fmt in ("int4", "fp8", "int8"):
        if elapsed() > TIME_BUDGET_S:
            break
        if fmt != "int4":
            del model
            torch.cuda.empty_cache()
            model = random_lm()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        quantize_model(model, fmt, group_size=GROUP_SIZE)
        torch.cuda.synchronize()
        entry: dict[str, object] = {
            "quantize_s": time.perf_counter() - t0,
            "allocated_minus_baseline_GB": (torch.cuda.memory_allocated() - baseline) / 1e9,
            "weights_GB": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9,
            "peak_while_quantizing_GB": torch.cuda.max_memory_allocated() / 1e9,
            "bf16_model_GB": before / 1e9,
        }
        with torch.no_grad():
            text, audio = (t.float() for t in model(codes))
        for label, out, ref in (("text", text, text_ref), ("audio", audio, audio_ref)):
            ok = torch.isfinite(ref)
            entry[f"{label}_logit_rel_err"] = rel_err(out[ok], ref[ok])
            entry[f"{label}_greedy_agreement"] = (
                (out.nan_to_num().argmax(-1) == ref.nan_to_num().argmax(-1))[ok[..., 0]].float().mean().item())
        entry["frame_linears_ms"] = {b: time_frame_linears(model, b) for b in BATCHES}
        RESULTS[f"model_{fmt}"] = entry
        RESULTS["frame_linears_ms"][fmt] = entry["frame_linears_ms"]
        print(fmt, json.dumps(entry), flush=True)
        save()


def frame_linears_only(label: str) -> None:
    """Part 2's per-frame time of the linear products alone, per format and batch, with the
    default launch shapes: a quick comparison of two versions of the kernels (LABEL names the
    version; $LINEAR_FORMATS, default bf16,fp8,int4, picks the formats)."""
    for fmt in os.environ.get("LINEAR_FORMATS", "bf16,fp8,int4").split(","):
        model = random_lm()
        if fmt != "bf16":
            quantize_model(model, fmt, group_size=GROUP_SIZE)
        RESULTS.setdefault("frame_linears_ms", {})[fmt] = {b: round(time_frame_linears(model, b), 3) for b in BATCHES}
        print(label, fmt, RESULTS["frame_linears_ms"][fmt], flush=True)
        del model
        torch.cuda.empty_cache()
    RESULTS["label"] = label
    save()


MIMI_SHAPES = [(1536, 512), (512, 512), (2048, 512), (512, 2048)]  # Mimi's transformer: in_proj, out_proj, FFN
DEPFORMER_HEAD = (2048, 1024)  # a depformer step's logits head


@dataclass(frozen=True)
class GemvSet:
    """What a GEMV sweep covers: the products' shapes and how many of each a frame runs, the
    rows of x, the weights' dtype (plain weights), and whether the launch shapes are the narrow
    ones of small layers (`gemv_configs`)."""

    per_frame: dict[tuple[int, int], int]  # (N, K): products of that shape a frame
    rows: int
    dtype: torch.dtype
    narrow: bool


NARROW_WEIGHTS = 2**23  # layers of at most this many weights take `gemv_configs(narrow=True)`
GEMV_SETS = {
    # One row: the temporal layers, and the depformer's (the int4 and int8 steps run them through
    # the GEMV; bf16 and fp8 ones are fused at one row).
    "gemv": GemvSet({shape: 32 for shape in TEMPORAL_SHAPES} | {DEPFORMER_SHAPES[0]: 8}
                    | {shape: 48 for shape in DEPFORMER_SHAPES[1:]}, 1, torch.bfloat16, False),
    "gemv-mimi": GemvSet({shape: 16 for shape in MIMI_SHAPES}, 2, torch.float32, True),  # 8 layers each side
    "gemv-depformer": GemvSet({DEPFORMER_SHAPES[0]: 8, DEPFORMER_HEAD: 8}  # per step: input product, logits head
                              | {shape: 48 for shape in DEPFORMER_SHAPES[1:]}, 2, torch.bfloat16, True),  # 6 layers x 8 steps
}


def gemv_configs(narrow: bool = False) -> list[KernelConfig]:
    """GEMV launch shapes: rows per program, K per iteration, K split, and the loads pipelined
    (num_stages 3 or 4: asynchronous copies that many tiles ahead, less one) or not (1), for
    each accumulator chunk of $GEMV_CHUNKS (default 1; run X swept 1,8,16).
    `narrow`: for small layers (Mimi's, K 512 or 2048; the depformer's, K 1024 or 2816),
    narrower tiles and deeper splits."""
    chunks = [int(chunk) for chunk in os.environ.get("GEMV_CHUNKS", "1").split(",")]
    if narrow:
        return [KernelConfig(1, bn, bk, sk, warps, stages, chunk) for chunk in chunks for stages in (1, 3)
                for warps in (2, 4) for bn in (2, 4, 8, 16) for bk in (128, 256, 512) for sk in (1, 2, 4)
                if 512 <= bn * bk <= 4096]
    return [KernelConfig(1, bn, bk, sk, warps, stages, chunk) for chunk in chunks for stages in (1, 3, 4, 6)
            for warps in (4, 8) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024, 2048) for sk in (1, 2)
            if 2048 <= bn * bk <= 16384]


def gemv_weights(kind: WeightKind, n: int, k: int, dtype: torch.dtype = torch.bfloat16,
                 copies: int | None = None) -> tuple[list[tuple], int, int]:
    """Enough copies of one random layer in `kind` (PLAIN: in `dtype`) to outrun L2 (or
    `copies` of them): [(weight, scales, biases)], group size, bytes."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    if kind == WeightKind.PLAIN:
        layer, group = (w.to(dtype), None, None), 1
    elif kind == WeightKind.FP8:
        fp8 = Fp8Linear.from_weight(w)
        layer, group = (fp8.weight_fp8, fp8.scales, None), 1
    else:
        int4 = Int4Linear.from_weight(w, GROUP_SIZE)
        layer, group = (int4.qweight, int4.scales, int4.biases), GROUP_SIZE
    nbytes = sum(t.numel() * t.element_size() for t in layer if t is not None)
    count = copies or copies_for(nbytes)
    return [tuple(t if t is None else t.clone() for t in layer) for _ in range(count)], group, nbytes


def time_launch_shapes(kind: WeightKind, x: torch.Tensor, copies: list[tuple], group: int, nbytes: int,
                       configs: list[KernelConfig | None], reference: torch.Tensor, replays: int) -> list[dict]:
    """Each launch shape (None: the default one) fitted to the layer: its error against
    `reference` and its time over the layer's copies, [{config, default, us, TBps, err}]."""
    n, k = copies[0][0].shape[0], x.shape[1]
    trials = []
    for config in configs:
        fitted = qmm.fit_config(config or qmm.default_config(kind, x.shape[0], n, k), kind, k, group)
        err = rel_err(quantized_linear(x, *copies[0], kind, group, fitted), reference)
        us = graph_time_us([lambda c=c: quantized_linear(x, *c, kind, group, fitted) for c in copies], replays)
        trials.append({"config": asdict(fitted), "default": config is None, "us": round(us, 2),
                       "TBps": round(nbytes / us / 1e6, 2), "err": err})
    return trials


def frame_ms(products: GemvSet, rows: list[dict], column: str) -> float:
    """Milliseconds of a frame's worth of the swept products in `rows`, each at its `column`'s time."""
    return round(sum(products.per_frame[(row["n"], row["k"])] * row[column]["us"] for row in rows) / 1000, 3)


def gemv_sweep(which: str) -> None:
    """--gemv: each one-row product over `gemv_configs`, per kind of $GEMV_KINDS (default FP8,INT4;
    PLAIN: bf16 weights, with cuBLAS beside them); then, for fp8 and int4, the frame's products
    at one row with the default shapes and with the fastest ones. --gemv-mimi and
    --gemv-depformer (`GEMV_SETS`): those products instead, plain weights only, at two rows,
    then a frame's worth of them through cuBLAS, the default shapes and the fastest ones."""
    rows = []
    products = GEMV_SETS[which]
    kinds = ([WeightKind.PLAIN] if which != "gemv"
             else [WeightKind[name] for name in os.environ.get("GEMV_KINDS", "FP8,INT4").split(",")])
    m, dtype = products.rows, products.dtype
    precompile([(kind, m, k, config) for kind in kinds for n, k in products.per_frame
                for config in gemv_configs(products.narrow or n * k <= NARROW_WEIGHTS)], dtype)
    for kind in kinds:
        for n, k in products.per_frame:
            copies, group, nbytes = gemv_weights(kind, n, k, dtype)
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            reference = quantized_linear(x, *copies[0], kind, group, KernelConfig(1, 16, 256, 1, 4, 1)).float()
            trials = []
            if kind == WeightKind.PLAIN:  # cuBLAS beside it, as the model runs bf16 weights today
                us = graph_time_us([lambda c=c: F.linear(x, c[0]) for c in copies], 9)
                trials.append({"config": "cuBLAS", "default": False, "us": round(us, 2),
                               "TBps": round(nbytes / us / 1e6, 2), "err": rel_err(F.linear(x, copies[0][0]), reference)})
            narrow = products.narrow or n * k <= NARROW_WEIGHTS
            trials += time_launch_shapes(kind, x, copies, group, nbytes, [None] + gemv_configs(narrow), reference, 9)
            ours = [t for t in trials if t["config"] != "cuBLAS"]
            best = min((t for t in ours if t["err"] < 1e-3), key=lambda t: t["us"])
            TUNED[(int(kind), m, n, k)] = KernelConfig(**best["config"])
            row = {"kind": kind.name, "n": n, "k": k, "rows": m, "dtype": str(dtype), "default": ours[0], "best": best,
                   "best_unpipelined": min((t for t in ours[1:] if t["config"]["num_stages"] == 1), key=lambda t: t["us"]),
                   "trials": trials}
            if kind == WeightKind.PLAIN:
                row["cublas"] = trials[0]
            rows.append(row)
            print(f"{kind.name} {n}x{k}: {trials[0]['config'] if kind == WeightKind.PLAIN else 'default'} "
                  f"{trials[0]['us']} us ({trials[0]['TBps']} TB/s), best {best['us']} ({best['TBps']}) {best['config']}, "
                  f"best unpipelined {row['best_unpipelined']['us']} [{elapsed():.0f}s]", flush=True)
            RESULTS["gemv"] = rows
            save()
            del copies
    RESULTS["label"] = which
    if which != "gemv":  # a frame's worth of these products
        per_frame = {column: frame_ms(products, rows, column) for column in ("cublas", "default", "best")}
        RESULTS[f"{which.removeprefix('gemv-')}_products_ms"] = per_frame
        print(which, "products per frame, ms", per_frame, flush=True)
        save()
        return
    plain = [row for row in rows if row["kind"] == "PLAIN" and (row["n"], row["k"]) in TEMPORAL_SHAPES]
    if plain:  # a frame's 32 temporal layers, bf16 weights: cuBLAS against the fastest GEMV shapes
        RESULTS["plain_temporal_ms"] = {column: frame_ms(products, plain, column) for column in ("cublas", "best")}
        print("bf16 temporal products per frame", RESULTS["plain_temporal_ms"], flush=True)
    for fmt in [kind.name.lower() for kind in kinds if kind in (WeightKind.FP8, WeightKind.INT4)]:
        model = random_lm()
        quantize_model(model, fmt, group_size=GROUP_SIZE)
        qmm.default_config = DEFAULT_CONFIG
        default_ms = time_frame_linears(model, 1)
        qmm.default_config = tuned_config
        RESULTS.setdefault("frame_linears_ms_1_row", {})[fmt] = {"default": round(default_ms, 3),
                                                                 "tuned": round(time_frame_linears(model, 1), 3)}
        qmm.default_config = DEFAULT_CONFIG
        print(fmt, RESULTS["frame_linears_ms_1_row"][fmt], flush=True)
        del model
        torch.cuda.empty_cache()
    save()


DOT_ROWS = (8, 32, 64)
# (output columns, K per iteration, warps, loads in flight) per program: the H100 table's narrow
# tiles, and wider ones that re-read x less (a [rows, K] x tile is read once per BLOCK_N
# columns; at 64 rows and 64 int4 columns that is four times the weight bytes) and keep more
# weight bytes in flight per SM.
DOT_TILES = ((32, 256, 4, 3), (64, 128, 4, 3), (64, 256, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3),
             (128, 128, 8, 4), (256, 64, 8, 3), (256, 64, 8, 4), (256, 128, 8, 3))


def dot_configs(rows: int) -> list[KernelConfig]:
    """Several-row launch shapes: `DOT_TILES`, K split over 1-4 programs (8 for the wide
    tiles, which are few), and from 32 rows the rows also padded to 64 (wgmma's height)."""
    heights = [16] if rows <= 16 else sorted({min(rows, 64), 64})
    return [KernelConfig(bm, bn, bk, sk, warps, stages) for bm in heights for bn, bk, warps, stages in DOT_TILES
            for sk in ((1, 2, 4, 8) if bn >= 128 else (1, 2, 4))]


def _compile_product(task: tuple[int, int, int, str, dict]) -> str:
    """Worker: build (and run once) one kernel at `rows` x K, so that a sweep's own process finds
    it in Triton's cache instead of compiling ~100 launch shapes one by one."""
    kind, rows, k, dtype_name, config = task
    dtype = getattr(torch, dtype_name)
    copies, group, _ = gemv_weights(WeightKind(kind), 256, k, dtype, copies=1)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    try:
        quantized_linear(x, *copies[0], WeightKind(kind), group, KernelConfig(**config))
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # the sweep then skips it; say which
        return f"{config}: {exc!r}"[:300]


def precompile(candidates: list[tuple[WeightKind, int, int, KernelConfig]], dtype: torch.dtype = torch.bfloat16) -> None:
    """Every (kind, rows, K, launch shape) a sweep will time, fitted to its K, compiled in worker
    processes side by side (K itself is not compiled in: one K per fitted shape is enough)."""
    import concurrent.futures
    import multiprocessing

    tasks: dict[tuple, int] = {}
    for kind, rows, k, config in candidates:
        fitted = tuple(sorted(asdict(qmm.fit_config(config, kind, k, GROUP_SIZE if kind == WeightKind.INT4 else 1)).items()))
        tasks.setdefault((int(kind), rows, fitted), k)
    work = [(kind, rows, k, str(dtype).removeprefix("torch."), dict(config)) for (kind, rows, config), k in tasks.items()]
    workers = min(14, os.cpu_count() or 2)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failures = [message for message in pool.map(_compile_product, work) if message]
    print(f"compiled {len(work)} kernels in {workers} processes [{elapsed():.0f}s]; failed: {failures[:5]}", flush=True)


def dot_sweep() -> None:
    """--dot: each several-row product of a frame at 8, 32 and 64 rows over `dot_configs`, per
    kind of $DOT_KINDS (default INT4; FP8 too); then the frame's products with the default
    shapes and with the fastest ones, beside bf16 (cuBLAS)."""
    rows_out = []
    kinds = [WeightKind[name] for name in os.environ.get("DOT_KINDS", "INT4").split(",")]
    shapes = TEMPORAL_SHAPES + DEPFORMER_SHAPES
    precompile([(kind, rows, k, config) for kind in kinds for _, k in shapes for rows in DOT_ROWS
                for config in dot_configs(rows)])
    for kind in kinds:
        for n, k in shapes:
            copies, group, nbytes = gemv_weights(kind, n, k)
            for rows in DOT_ROWS:
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                reference = quantized_linear(x, *copies[0], kind, group).float()
                trials = time_launch_shapes(kind, x, copies, group, nbytes, [None] + dot_configs(rows), reference, 7)
                best = min((t for t in trials if t["err"] < 1e-2), key=lambda t: t["us"])
                TUNED[(int(kind), rows, n, k)] = KernelConfig(**best["config"])
                rows_out.append({"kind": kind.name, "n": n, "k": k, "rows": rows, "default": trials[0], "best": best,
                                 "trials": trials})
                print(f"{kind.name} {n}x{k} x{rows}: default {trials[0]['us']} us ({trials[0]['TBps']} TB/s), best "
                      f"{best['us']} ({best['TBps']}) {best['config']} [{elapsed():.0f}s]", flush=True)
                RESULTS["dot"] = rows_out
                save()
            del copies
    RESULTS["label"] = "dot"
    batches = (1, *DOT_ROWS)
    model = random_lm()
    RESULTS["frame_linears_ms"] = {"bf16": {b: round(time_frame_linears(model, b), 3) for b in batches}}
    print("bf16", RESULTS["frame_linears_ms"]["bf16"], flush=True)
    for kind in kinds:
        fmt = kind.name.lower()
        if kind != kinds[0]:
            model = random_lm()
        quantize_model(model, fmt, group_size=GROUP_SIZE)
        RESULTS["frame_linears_ms"][fmt] = {b: round(time_frame_linears(model, b), 3) for b in batches}
        qmm.default_config = tuned_config
        RESULTS["frame_linears_ms"][f"{fmt}_tuned"] = {b: round(time_frame_linears(model, b), 3) for b in batches}
        qmm.default_config = DEFAULT_CONFIG
        print(fmt, RESULTS["frame_linears_ms"][fmt], "tuned", RESULTS["frame_linears_ms"][f"{fmt}_tuned"], flush=True)
        save()
        del model
        torch.cuda.empty_cache()


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    RESULTS["device"] = {"name": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                         "triton": triton.__version__}
    print(RESULTS["device"], flush=True)
    if "--frame-linears" in sys.argv:  # [--frame-linears LABEL]: only the frame's products
        frame_linears_only(sys.argv[sys.argv.index("--frame-linears") + 1])
        return
    sweeps = [name for name in GEMV_SETS if f"--{name}" in sys.argv]
    if sweeps:
        gemv_sweep(sweeps[0])
        return
    if "--dot" in sys.argv:
        dot_sweep()
        return
    qmm.default_config = tuned_config  # the model part runs with the fastest launch shapes found
    RESULTS["odd_shape_errors"] = odd_shape_errors()
    print("odd shapes", RESULTS["odd_shape_errors"], flush=True)
    rows = []
    for n, k in TEMPORAL_SHAPES + DEPFORMER_SHAPES:
        for m in BATCHES:
            try:
                row = bench_shape(n, k, m, do_sweep=True)
            except Exception as exc:  # keep measuring the other shapes; the JSON says what broke
                rows.append({"n": n, "k": k, "m": m, "error": repr(exc)[:400]})
                print(n, k, m, "ERROR", repr(exc)[:400], flush=True)
                continue
            rows.append(row)
            RESULTS["layers"] = rows
            save()
            best = row.get("int4_triton_best", {})
            print(f"{n:6d}x{k:<6d} M={m:<3d} bf16 {row['bf16_us']:7.1f}us  fp8 mm {row['fp8_scaled_mm_us']:7.1f} "
                  f"tri {row['fp8_triton_us']:7.1f}  int4 tg {row.get('int4_tinygemm_us', float('nan')):7.1f} "
                  f"tri {row['int4_triton_us']:7.1f} best {best.get('us', float('nan')):7.1f} {best.get('config')}  "
                  f"int8 {row['int8_triton_us']:7.1f}  [{elapsed():.0f}s]", flush=True)
    try:
        model_checks()
    except Exception as exc:
        RESULTS["model_error"] = repr(exc)[:1000]
        print("model checks ERROR", repr(exc)[:1000], flush=True)
    print(json.dumps({k: v for k, v in RESULTS.items() if k != "layers"}, indent=1))
    save()


if __name__ == "__main__":
    sys.exit(main())
