"""Registers and spills of a Triton kernel compiled for sm_90a (H100 / H200) on a machine with
no GPU: Triton's compiler and the ptxas bundled with it need no device. Install the GPU
machine's Triton beside ours to see what it will compile (pip install --no-deps --target
/tmp/t36 triton==3.6.0, then PYTHONPATH=/tmp/t36).

    python3 bench/offline_compile.py depformer ROWS WARPS BLOCK_N WEIGHT_TILE [FP8 [SAMPLE]]
      (FP8 1: the layers' weights in fp8 with row scales; registers capped as the launch caps
      them for two programs an SM; SAMPLE 1: the frame kernel, which draws each step's tokens)
    python3 bench/offline_compile.py quantized KIND BLOCK_M BLOCK_N BLOCK_K SPLIT_K WARPS STAGES [ROWS [CHUNK]]
      (KIND 0 int4, 2 fp8, 3 plain bf16; BLOCK_M 1 is the GEMV kernel, for ROWS rows of x: 1 or 2,
      its accumulator chunked by CHUNK)
"""

from __future__ import annotations

import collections
import inspect
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from personaplex.model.kernels import fused_depformer, quantized_matmul  # noqa: E402

DIVISIBLE = ("N", "K", "stride_xm", "stride_om")  # integer arguments the model passes as multiples of 16
COUNTED = ("LDGSTS", "LDG", "FFMA", "I2F", "F2FP", "HMMA", "HGMMA", "BAR", "STL", "LDL", "SHFL", "STS", "LDS", "LDSM", "LOP3", "PRMT", "SHF", "IMAD", "HFMA2", "F2F", "HADD2", "MOV")


def compile_sm90(fn, types: dict[str, str], constants: dict, num_warps: int, num_stages: int = 3,
                 maxnreg: int | None = None) -> str:
    """ptxas's resource line and a count of telling SASS instructions."""
    params = list(inspect.signature(fn.fn).parameters)
    signature = {name: types.get(name, "constexpr") for name in params if name in types or name in constants}
    # Triton specializes, at run time, pointers and integers divisible by 16 (the model's always
    # are): mark them so, or the offline code lacks the vector and asynchronous loads the GPU gets.
    aligned = [name for name in signature if name in types and (types[name].startswith("*") or name in DIVISIBLE)]
    source = triton.compiler.ASTSource(fn, signature, constexprs={(params.index(k),): v for k, v in constants.items()},
                                       attrs={(params.index(name),): [["tt.divisibility", 16]] for name in aligned})
    options = dict(num_warps=num_warps, num_stages=num_stages) | ({"maxnreg": maxnreg} if maxnreg else {})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    tools = Path(triton.__path__[0]) / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as folder:
        ptx, cubin = Path(folder) / "k.ptx", Path(folder) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        # The ptxas Triton itself takes for sm_90 where it reads this PTX version, else the newer one.
        for assembler in ("ptxas", "ptxas-blackwell"):
            run = subprocess.run([tools / assembler, "-v", "--gpu-name", "sm_90a", ptx, "-o", cubin],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                break
        ptxas = run.stderr
        sass = subprocess.run([tools / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    ops = collections.Counter(re.findall(r"\s([A-Z][A-Z0-9_]+)[.\s]", sass))
    resources = [line.split(": ", 1)[-1].strip() for line in ptxas.splitlines() if "Used" in line or "spill" in line]
    return (f"triton {triton.__version__}, {assembler}: {'; '.join(resources)}; {sum(ops.values())} instructions; "
            + ", ".join(f"{op} {ops[op]}" for op in COUNTED))


def depformer(rows: int, warps: int, block_n: int, weight_tile: int, fp8: int = 0, sample: int = 0) -> str:
    """The fused depformer's steps at PersonaPlex's depformer shape, bf16 weights (or fp8 ones);
    with `sample`, the frame's kernel that draws each step's tokens."""
    pointers = ["x_ptr", "next_x_ptr", "keys_ptr", "values_ptr", "residual_ptr", "q_ptr", "attn_ptr", "gate_ptr",
                "logits_ptr", "projections_ptr"]
    types = {**{name: "*bf16" for name in pointers}, "table_ptr": "*i64", "scales_table_ptr": "*i64",
             "heads_table_ptr": "*i64", "embeddings_table_ptr": "*i64", "counter_ptr": "*i32",
             "phase_ends_ptr": "*i64", "tokens_ptr": "*i64", "targets_ptr": "*i64", "provided_ptr": "*i1",
             "temperature_ptr": "*fp32", "top_k_ptr": "*i64", "noise_ptr": "*i64",
             **{name: "i32" for name in ("projections_row_stride", "targets_row_stride", "provided_row_stride", "rows",
                                         "first_step", "steps", "first_phase", "end_phase")},
             "eps": "fp32", "scale": "fp32"}
    shape = fused_depformer.LaunchShape(block_n, weight_tile, warps, programs_per_sm=2)
    constants = dict(LAYERS=6, DIM=1024, HIDDEN=2816, CARD=2048, HEADS=16, HEAD_DIM=64, SLOTS=16, HEADS_TILE=16,
                     DIM_TILE=64, SLOT_CHUNK=shape.attention_slots,
                     WEIGHT_TYPE=tl.float8e4nv if fp8 else tl.bfloat16, ALPHA_TYPE=tl.bfloat16,
                     SCALED=bool(fp8), PRODUCT_TYPE=tl.bfloat16, PERSISTENT=True, TIMED=False, SAMPLE=bool(sample),
                     KEY_BITS=16, CARD_TILE=2048, WIDTH_TILE=1024,
                     **fused_depformer.tile_constants(rows, shape, programs=132 * 2, dim=1024, hidden=2816,
                                                      card=2048))
    # An sm_90 SM's register file: 65536.
    return compile_sm90(fused_depformer._depformer_steps, types, constants, warps,
                        maxnreg=fused_depformer.register_cap(65536, shape))


def quantized(kind: int, block_m: int, block_n: int, block_k: int, split_k: int, warps: int, stages: int,
              rows: int = 1, chunk: int = 1) -> str:
    """A product's kernel: int4 with groups of 64, fp8, or plain bf16 weights; for the GEMV
    (block_m 1), at `rows` rows of x (1 or 2), its accumulator chunked by `chunk`."""
    weights, scales = {2: ("*fp8e4nv", "*fp32"), 3: ("*bf16", "*bf16")}.get(kind, ("*u8", "*fp16"))
    types = {"x_ptr": "*bf16", "w_ptr": weights, "scales_ptr": scales, "biases_ptr": "*fp16", "out_ptr": "*bf16",
             "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32"}
    constants = dict(KIND=kind, GROUP_SIZE=64, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k)
    if block_m == 1:
        constants |= dict(NUM_STAGES=stages, TWO_ROWS=rows == 2, CHUNK=chunk, PTX=True)
        return compile_sm90(quantized_matmul._gemv_kernel, types, constants, warps, stages)
    return compile_sm90(quantized_matmul._dot_kernel, types, {**constants, "BLOCK_M": block_m}, warps, stages)


if __name__ == "__main__":
    which, numbers = sys.argv[1], [int(value) for value in sys.argv[2:]]
    print({"depformer": depformer, "quantized": quantized}[which](*numbers))
