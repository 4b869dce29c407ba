"""GPU check: the fast path's pieces against the readable ones, at full size.

Prints relative errors of (1) the Triton ring attention vs SDPA, (2) the compiled
element-wise ops vs eager, (3) one LM frame from the same state: readable vs fast kernels, in bf16 (where rounding
differs: the compiled ops round once where eager rounds twice) and in float32 (where the two
must agree to float32 precision: a wrong kernel shows here).
Run: PYTHONPATH=src python3 bench/check_fast_path.py
"""

from __future__ import annotations

import torch

from personaplex.bench import build_lm, make_persona
from personaplex.model import layers
from personaplex.model import lm as lm_module
from personaplex.model.kernels.decode_attention import decode_attention
from personaplex.runtime.generation import FrameGenerator, StepInputs
from personaplex.runtime.sampling import SamplingConfig


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def main() -> None:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(4, 32, 1, 128, device=device, generator=gen, dtype=torch.bfloat16)
    k = torch.randn(4, 32, 3000, 128, device=device, generator=gen, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lengths = torch.tensor([1, 57, 2999, 3000], device=device)
    expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[b : b + 1], k[b : b + 1, :, : int(n)], v[b : b + 1, :, : int(n)]) for b, n in enumerate(lengths)])
    print("ring attention vs SDPA rel err:", rel(decode_attention(q, k, v, lengths), expected))

    x = torch.randn(8, 1, 4096, device=device, dtype=torch.bfloat16)
    alpha = torch.rand(1, 1, 4096, device=device) + 0.5
    positions = torch.randint(0, 3000, (8, 1), device=device)
    heads = torch.randn(8, 32, 1, 128, device=device, dtype=torch.bfloat16)
    hidden = torch.randn(8, 1, 2 * 11264, device=device, dtype=torch.bfloat16)
    layers.compile_elementwise(True)
    compiled = {n: f for n, f in layers._elementwise.items()}
    print("compiled rms_norm rel err:", rel(compiled["rms_norm"](x, alpha, 1e-8), layers.rms_norm(x, alpha, 1e-8)))
    print("compiled rope rel err:", rel(compiled["rope"](heads, positions, 1e4), layers.rope(heads, positions, 1e4)))
    print("compiled silu_gate rel err:", rel(compiled["silu_gate"](hidden), layers.silu_gate(hidden)))

    for dtype in (torch.bfloat16, torch.float32):
        compare_one_frame(dtype, gen)


def compare_one_frame(dtype: torch.dtype, gen: torch.Generator) -> None:
    lm, _ = build_lm("bf16", torch.device("cuda"))
    lm = lm.to(dtype)
    persona, _ = make_persona(lm)
    user = torch.randint(0, 2048, (1, 8), device="cuda", generator=gen)

    def one_frame(fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        lm_module.USE_FAST_KERNELS = fast
        layers.compile_elementwise(fast)
        generator = FrameGenerator(lm, 1, SamplingConfig(greedy=True), seed=0)
        persona.restore(generator)
        model_input, _, _ = generator.prepare(StepInputs(user=user))
        embeddings = lm.embed_codes(model_input[:, :, None])
        hidden, text_logits = lm.forward_temporal(embeddings, generator.temporal)
        return hidden.float(), text_logits.float()

    readable_hidden, readable_logits = one_frame(False)
    fast_hidden, fast_logits = one_frame(True)
    print(f"one frame in {dtype}, fast vs readable: hidden", rel(fast_hidden, readable_hidden),
          "text logits", rel(fast_logits, readable_logits), "argmax equal", bool(fast_logits.argmax() == readable_logits.argmax()))


if __name__ == "__main__":
    main()
