"""The PersonaPlex language model: a temporal transformer over frames and a depformer over codebooks.

Per 80 ms frame the model sees 17 token streams (1 text, 8 agent audio, 8 user audio),
sums their embeddings, runs the 32-layer temporal transformer (causal over frames, with a
3000-frame window, of which streaming sees the last 2999 as NVIDIA's reference does),
predicts the text token with `text_linear`, then runs the small depformer once per audio
codebook (causal over codebooks, separate weights per step) to predict the audio tokens one
after the other.

Two paths share the weights:
- `forward(codes)`: teacher-forced over a whole sequence (no state), as upstream's training forward;
- `forward_temporal(embeddings, state)` + `depformer_step(...)`: streaming, one frame (or a chunk
  of prompt frames) at a time, with explicit state objects.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig
from .kernels import GEMV_MAX_ROWS, SAMPLING_PART_WIDTH, KernelOperands, WeightKind, cuda_op, kernels_can_run
from .kv_cache import TemporalState, ring_capacity, sliding_window_mask
from .layers import (READABLE_KERNELS, GatedFFN, Kernels, RMSNorm, embed_with_zero, kernel_operands, linear,
                     merge_heads, rope,
                     shared_rope_angles, split_heads)
from .quantize import Fp8Linear

UNGENERATED_TOKEN = -2  # "not generated yet": must never reach the model


# --------------------------------------------------------------------------- temporal transformer


class TemporalAttention(nn.Module):
    def __init__(self, config: LMConfig, device=None, dtype=None):
        super().__init__()
        self.num_heads = config.num_heads
        self.max_period = config.max_period
        self.in_proj = nn.Linear(config.dim, 3 * config.dim, bias=False, device=device, dtype=dtype)
        self.out_proj = nn.Linear(config.dim, config.dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, view: "AttentionView", layer_index: int) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in linear(self.in_proj, x, view.kernels).chunk(3, dim=-1))
        state = view.state
        if state is not None and x.shape[1] == 1:
            return linear(self.out_proj, merge_heads(attend_ring(q, k, v, positions, state, layer_index, view)),
                          view.kernels)
        q = rope(q, *view.rope)
        k = rope(k, *view.rope)
        if state is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=view.mask)
        else:
            # A chunk of prompt frames: attend over (cache before the chunk) + (the chunk), then
            # store it; writing first could overwrite keys earlier frames of the chunk still need.
            cached_k, cached_v = state.layer_kv(layer_index, k.dtype)
            all_k = torch.cat([cached_k, k], dim=2)
            all_v = torch.cat([cached_v, v], dim=2)
            state.write(layer_index, k, v, positions)
            out = F.scaled_dot_product_attention(q, all_k, all_v, attn_mask=view.mask)
        return linear(self.out_proj, merge_heads(out), view.kernels)


@dataclass
class AttentionView:
    """What every layer's attention needs for one forward: the state, and the mask for a
    whole sequence or a chunk over cache + chunk. A single live frame has no mask up front:
    the readable path builds it from the frame's positions once (`ring_mask`), and the fast
    kernel needs none."""

    state: TemporalState | None
    mask: torch.Tensor | None  # [B, 1, T, keys] bool; None for a single live frame
    # No default: torch.compile (2.11) cannot follow a dataclass field's default object.
    kernels: Kernels
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin of the frames' RoPE angles
    _ring_mask: torch.Tensor | None = None

    def ring_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """The filled ring slots once the single frame at `positions` [B, 1] is written:
        built by the first layer that asks and kept for the others (a plain attribute rather
        than functools.cached_property, whose lock torch.compile cannot trace)."""
        if self._ring_mask is None:
            self._ring_mask = self.state.filled_slot_mask(self.state.filled_slots_after(positions))
        return self._ring_mask


def attend_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                state: TemporalState, layer_index: int, view: AttentionView) -> torch.Tensor:
    """One live frame (q and k before RoPE): its keys/values go to its slot (which held the
    frame that just left the window), then its query attends over the ring in place (no copy of
    the cache). The fast kernel does both in one launch, RoPE included, and reads only the
    filled slots (fp8 caches as they are); the readable path rotates, writes, then runs SDPA
    with a mask over every slot."""
    cos, sin = view.rope
    if view.kernels.ring_attention and kernels_can_run(q):
        # The frame's position is the state's next_position (positions[:, 0]), passed as the
        # state buffer itself (see the op).
        return cuda_op("ring_attention")(q, k, v, state.keys[layer_index], state.values[layer_index],
                                         state.next_position, cos, sin)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    state.write(layer_index, k, v, positions)
    keys, values = state.layer_kv(layer_index, q.dtype)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=view.ring_mask(positions))


class TemporalLayer(nn.Module):
    def __init__(self, config: LMConfig, device=None, dtype=None):
        super().__init__()
        self.norm1 = RMSNorm(config.dim, config.norm_eps, device=device)
        self.self_attn = TemporalAttention(config, device=device, dtype=dtype)
        self.norm2 = RMSNorm(config.dim, config.norm_eps, device=device)
        self.gating = GatedFFN(config.dim, config.hidden_dim, device=device, dtype=dtype)

    def forward(self, x, positions, view, layer_index):
        x = x + self.self_attn(self.norm1(x), positions, view, layer_index)
        return x + self.gating(self.norm2(x), view.kernels)


class TemporalTransformer(nn.Module):
    def __init__(self, config: LMConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(TemporalLayer(config, device=device, dtype=dtype) for _ in range(config.num_layers))

    def forward(self, x: torch.Tensor, state: TemporalState | None = None,
                kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]. Without state, the T frames are the whole history.

        As in NVIDIA's reference, the whole-sequence forward masks to `context` frames while
        streaming sees `state.capacity` = context - 1 (see `ring_capacity`): a chunk of prompt
        frames attends with that window, so it equals the same frames fed one at a time."""
        batch, frames, _ = x.shape
        if state is None:
            positions = torch.arange(frames, device=x.device).expand(batch, frames)
            view = AttentionView(None, sliding_window_mask(positions, positions, self.config.context), kernels)
        elif frames == 1:
            positions = state.chunk_positions(1)
            view = AttentionView(state, None, kernels)
        else:
            positions = state.chunk_positions(frames)
            key_positions = torch.cat([state.slot_positions, positions], dim=1)
            view = AttentionView(state, sliding_window_mask(positions, key_positions, state.capacity), kernels)
        view.rope = shared_rope_angles(positions, self.config.head_dim, self.config.max_period)
        for index, layer in enumerate(self.layers):
            x = layer(x, positions, view, index)
        if state is not None:
            state.advance(positions)
        return x


# --------------------------------------------------------------------------- depformer


@dataclass
class DepformerState:
    """Keys/values of the depformer steps already run in the current frame: per layer a ring
    of dep_q slots that never wraps (step k writes slot k and sees slots 0..k)."""

    keys: torch.Tensor  # [layers, B, heads, steps, head_dim]
    values: torch.Tensor
    step_positions: torch.Tensor  # [steps, B] int64, row k all k: step k's position, as the ring kernel takes it


class DepformerAttention(nn.Module):
    """Causal attention over the codebook steps of one frame, with separate weights per step."""

    def __init__(self, config: LMConfig, device=None, dtype=None):
        super().__init__()
        dim = config.depformer_dim
        self.num_heads = config.depformer_num_heads
        self.in_projs = nn.ModuleList(
            nn.Linear(dim, 3 * dim, bias=False, device=device, dtype=dtype) for _ in range(config.dep_q)
        )
        self.out_projs = nn.ModuleList(
            nn.Linear(dim, dim, bias=False, device=device, dtype=dtype) for _ in range(config.dep_q)
        )

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: x [N, steps, dim], step k uses weights k."""
        steps = x.shape[1]
        qkv = torch.stack([self.in_projs[k](x[:, k]) for k in range(steps)], dim=1)
        q, k, v = (split_heads(t, self.num_heads) for t in qkv.chunk(3, dim=-1))
        out = merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return torch.stack([self.out_projs[s](out[:, s]) for s in range(steps)], dim=1)

    def forward_step(self, x: torch.Tensor, step: int, state: DepformerState, layer_index: int,
                     kernels: Kernels) -> torch.Tensor:
        """Streaming: x [B, 1, dim] is step `step`; attends to steps 0..step of this frame."""
        q, k, v = (split_heads(t, self.num_heads) for t in linear(self.in_projs[step], x, kernels).chunk(3, dim=-1))
        keys, values = state.keys[layer_index], state.values[layer_index]
        if kernels.ring_attention and kernels_can_run(q):
            out = cuda_op("ring_attention")(q, k, v, keys, values, state.step_positions[step])
        else:
            keys[:, :, step : step + 1] = k
            values[:, :, step : step + 1] = v
            out = F.scaled_dot_product_attention(q, keys[:, :, : step + 1], values[:, :, : step + 1])
        return linear(self.out_projs[step], merge_heads(out), kernels)


class DepformerLayer(nn.Module):
    def __init__(self, config: LMConfig, device=None, dtype=None):
        super().__init__()
        dim = config.depformer_dim
        self.norm1 = RMSNorm(dim, config.norm_eps, device=device)
        self.self_attn = DepformerAttention(config, device=device, dtype=dtype)
        self.norm2 = RMSNorm(dim, config.norm_eps, device=device)
        self.gating = nn.ModuleList(
            GatedFFN(dim, config.depformer_hidden_dim, device=device, dtype=dtype) for _ in range(config.dep_q)
        )

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn.forward_all(self.norm1(x))
        ffn_in = self.norm2(x)
        return x + torch.stack([self.gating[k](ffn_in[:, k]) for k in range(x.shape[1])], dim=1)

    def forward_step(self, x: torch.Tensor, step: int, state: DepformerState, layer_index: int,
                     kernels: Kernels) -> torch.Tensor:
        x = x + self.self_attn.forward_step(self.norm1(x), step, state, layer_index, kernels)
        return x + self.gating[step](self.norm2(x), kernels)


class Depformer(nn.Module):
    def __init__(self, config: LMConfig, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(DepformerLayer(config, device=device, dtype=dtype) for _ in range(config.depformer_num_layers))


# --------------------------------------------------------------------------- the whole LM


class LMModel(nn.Module):
    def __init__(self, config: LMConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        c = config
        kw = dict(device=device, dtype=dtype)
        self.text_emb = nn.Embedding(c.text_card + 1, c.dim, **kw)
        self.emb = nn.ModuleList(nn.Embedding(c.card + 1, c.dim, **kw) for _ in range(c.n_q))
        self.transformer = TemporalTransformer(c, **kw)
        self.out_norm = RMSNorm(c.dim, c.norm_eps, device=device)
        self.text_linear = nn.Linear(c.dim, c.text_card, bias=False, **kw)
        self.depformer_in = nn.ModuleList(nn.Linear(c.dim, c.depformer_dim, bias=False, **kw) for _ in range(c.dep_q))
        self.depformer_text_emb = nn.Embedding(c.text_card + 1, c.depformer_dim, **kw)
        self.depformer_emb = nn.ModuleList(nn.Embedding(c.card + 1, c.depformer_dim, **kw) for _ in range(c.dep_q - 1))
        self.depformer = Depformer(c, **kw)
        self.linears = nn.ModuleList(nn.Linear(c.depformer_dim, c.card, bias=False, **kw) for _ in range(c.dep_q))
        # Every step's depformer_in as one product, once `stack_depformer_inputs` has run.
        self.stacked_depformer_in: KernelOperands | None = None

    # ---- special tokens

    @property
    def audio_start_token(self) -> int:
        return self.config.card

    @property
    def text_start_token(self) -> int:
        return self.config.text_card

    def start_tokens(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The token every stream holds before the first frame: [num_codebooks]."""
        tokens = torch.full((self.config.num_codebooks,), self.audio_start_token, dtype=torch.long, device=device)
        tokens[0] = self.text_start_token
        return tokens

    # ---- streaming path

    def new_temporal_state(self, batch_size: int, device=None, dtype=None) -> TemporalState:
        """Empty streaming state; `dtype` is the KV cache's (default: the activations', or
        torch.float8_e4m3fn for half the memory)."""
        weight = self.text_linear.weight
        c = self.config
        return TemporalState.empty(
            c.num_layers, batch_size, c.num_heads, c.head_dim, ring_capacity(c.context),
            device=device or weight.device, dtype=dtype or self.activation_dtype,
        )

    def new_depformer_state(self, batch_size: int, device=None, dtype=None) -> DepformerState:
        c = self.config
        shape = (c.depformer_num_layers, batch_size, c.depformer_num_heads, c.dep_q, c.depformer_dim // c.depformer_num_heads)
        device = device or self.text_linear.weight.device
        dtype = dtype or self.activation_dtype
        step_positions = torch.arange(c.dep_q, device=device)[:, None].expand(-1, batch_size).contiguous()
        return DepformerState(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                              step_positions)

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.text_emb.weight.dtype

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the 17 stream embeddings: codes [B, num_codebooks, T] -> [B, T, dim]."""
        if codes.shape[1] != self.config.num_codebooks:
            raise ValueError(f"expected {self.config.num_codebooks} token streams, got {codes.shape[1]}")
        total = None
        for stream, embedding in enumerate(self.emb, start=1):
            audio = embed_with_zero(embedding, codes[:, stream])
            total = audio if total is None else total + audio
        return total + embed_with_zero(self.text_emb, codes[:, 0])

    def forward_temporal(
        self, embeddings: torch.Tensor, state: TemporalState | None = None, kernels: Kernels = READABLE_KERNELS
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, T, dim] -> (normed hidden [B, T, dim], text logits [B, T, text_card])."""
        hidden = self.out_norm(self.transformer(embeddings, state, kernels))
        return hidden, linear(self.text_linear, hidden, kernels)

    def depformer_step(
        self, step: int, hidden: torch.Tensor, previous_token: torch.Tensor, state: DepformerState,
        kernels: Kernels = READABLE_KERNELS, projections: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, card] of codebook `step` of one frame.

        hidden [B, 1, dim] is the frame's normed temporal output; previous_token [B] is the
        text token for step 0, else the audio token chosen at step - 1; `projections`, if
        given, the frame's `depformer_projections` (else this step's is computed here).
        """
        x = self.depformer_input(step, hidden, previous_token, kernels, projections)
        fused = x.shape[0] <= kernels.fused_depformer_max_rows and self.depformer_step_fusable(step, x.dtype)
        if fused and kernels_can_run(x):
            return cuda_op("fused_depformer_step")(x[:, 0], self.depformer_step_weights(step),
                                                   self.linears[step].weight, state.keys, state.values, step,
                                                   self.config.norm_eps, self.depformer_step_scales(step))
        for index, layer in enumerate(self.depformer.layers):
            x = layer.forward_step(x, step, state, index, kernels)
        return linear(self.linears[step], x[:, 0], kernels)

    def depformer_frame_fusable(self, steps: int, hidden: torch.Tensor, kernels: Kernels) -> bool:
        """Whether `fused_depformer_frame` can run the `steps` steps of a frame whose temporal
        output is `hidden` [B, 1, dim]: the fused step and the sampling kernel both chosen for its
        rows and able to run where it is, every step's weights readable by the fused kernel, the
        token embeddings plain in the activations' dtype, and a step's logits few enough for the
        kernel's one-part draw."""
        embeddings = [self.depformer_text_emb, *self.depformer_emb[:steps - 1]]
        return (kernels.sampling and hidden.shape[0] <= kernels.fused_depformer_max_rows
                and self.config.card <= SAMPLING_PART_WIDTH
                and all(type(e) is nn.Embedding and e.weight.dtype == hidden.dtype for e in embeddings)
                and all(self.depformer_step_fusable(step, hidden.dtype) for step in range(steps))
                and kernels_can_run(hidden))

    def fused_depformer_frame(
        self, steps: int, hidden: torch.Tensor, text_token: torch.Tensor, state: DepformerState,
        projections: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, noise_keys: torch.Tensor,
        targets: torch.Tensor, provided: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A frame's depformer steps 0 .. steps - 1 with their audio tokens drawn, in one launch
        (`kernels/fused_depformer.py`, where `depformer_frame_fusable`): what `depformer_step`
        and the sampler give step after step (each step reading the token drawn at the step
        before, or targets' where provided), as (tokens [B, steps], logits [steps, B, card]).
        text_token [B] is step 0's input token; projections the frame's `depformer_projections`;
        temperature, top_k [B] the rows' audio sampling; noise_keys [B, steps] a draw's key per
        row and step (`RowNoise.next_keys`); targets, provided [B, >= steps] the given tokens."""
        x = self.depformer_input(0, hidden, text_token, projections=projections)[:, 0]
        weights = [weight for step in range(steps) for weight in self.depformer_step_weights(step)]
        scales = [scale for step in range(steps) for scale in self.depformer_step_scales(step)]
        heads = [self.linears[step].weight for step in range(steps)]
        embeddings = [self.depformer_text_emb.weight, *(self.depformer_emb[step - 1].weight for step in range(1, steps))]
        return cuda_op("fused_depformer_frame")(x, projections, weights, heads, embeddings, state.keys, state.values,
                                                self.config.norm_eps, scales, temperature, top_k, noise_keys, targets,
                                                provided)

    def depformer_input(self, step: int, hidden: torch.Tensor, previous_token: torch.Tensor,
                        kernels: Kernels = READABLE_KERNELS, projections: torch.Tensor | None = None) -> torch.Tensor:
        """What enters step `step`'s first layer [B, 1, depformer_dim] (arguments as `depformer_step`'s)."""
        token_embedding = self.depformer_text_emb if step == 0 else self.depformer_emb[step - 1]
        projected = linear(self.depformer_in[step], hidden, kernels) if projections is None else projections[:, step, None]
        return projected + embed_with_zero(token_embedding, previous_token[:, None])

    def depformer_projections(self, hidden: torch.Tensor, kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        """depformer_in(hidden) of every step [B, steps, depformer_dim], hidden [B, 1, dim]: they
        do not depend on the tokens the steps sample, so a frame computes them all first. Once
        `stack_depformer_inputs` has run, the GEMV makes that one product at one or two rows (one-row frame on
        an H200: 31 -> 12 us for fp8 weights, 35 -> 19 for bf16; docs/PERFORMANCE.md run Y);
        else it is each step's layer in turn."""
        x = hidden[:, 0]
        one_product = kernels.gemv and x.shape[0] <= GEMV_MAX_ROWS and kernels_can_run(x)  # where it was measured
        if self.stacked_depformer_in is None or not one_product:
            return torch.stack([linear(layer, x, kernels) for layer in self.depformer_in], dim=1)
        weight, *_, kind, _ = self.stacked_depformer_in
        if kind == WeightKind.PLAIN:
            out = linear(weight, x, kernels)
        else:
            out = cuda_op("quantized_linear")(x.contiguous(), *self.stacked_depformer_in).to(x.dtype)
        return out.unflatten(-1, (len(self.depformer_in), -1))

    def stack_depformer_inputs(self) -> None:
        """Hold the steps' depformer_in weights (and scales) in one tensor of all their rows, each
        step's layer keeping a view of its own rows, for `depformer_projections`. Once only: a
        CUDA graph captured afterwards reads these addresses. Layers of mixed formats stay apart."""
        layers = list(self.depformer_in)
        if self.stacked_depformer_in is not None or any(kernel_operands(layer) is None for layer in layers):
            return
        if len({type(layer) for layer in layers}) != 1:
            return
        stacked = copy.copy(layers[0])  # a layer of the same format, whose tensors will hold every step's rows
        for table in ("_parameters", "_buffers"):  # nn.Module's own tables of its tensors
            whole = {name: None if tensor is None else torch.cat([getattr(layer, table)[name] for layer in layers])
                     for name, tensor in getattr(layers[0], table).items()}
            setattr(stacked, table, whole)
            for step, layer in enumerate(layers):
                for name, tensor in whole.items():
                    if tensor is not None:
                        rows = tensor.chunk(len(layers))[step]
                        getattr(layer, table)[name] = nn.Parameter(rows, requires_grad=False) if table == "_parameters" else rows
        self.stacked_depformer_in = kernel_operands(stacked)

    def depformer_step_linears(self, step: int, layer_index: int) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """Step `step`'s linears in depformer layer `layer_index`: in_proj, out_proj, linear_in,
        linear_out."""
        layer = self.depformer.layers[layer_index]
        ffn = layer.gating[step]
        return layer.self_attn.in_projs[step], layer.self_attn.out_projs[step], ffn.linear_in, ffn.linear_out

    def depformer_step_layer_linears(self, step: int) -> list[nn.Module]:
        """`depformer_step_linears` of every layer, first layer first."""
        return [linear for index in range(len(self.depformer.layers))
                for linear in self.depformer_step_linears(step, index)]

    def depformer_step_weights(self, step: int) -> list[torch.Tensor]:
        """Step `step`'s layer weights in the order the fused kernel reads them: per layer
        norm1, in_proj, out_proj, norm2, linear_in, linear_out."""
        def matrix(linear: nn.Module) -> torch.Tensor:
            return linear.weight_fp8 if isinstance(linear, Fp8Linear) else linear.weight

        weights = []
        for index, layer in enumerate(self.depformer.layers):
            in_proj, out_proj, linear_in, linear_out = self.depformer_step_linears(step, index)
            weights += [layer.norm1.alpha, matrix(in_proj), matrix(out_proj), layer.norm2.alpha, matrix(linear_in),
                        matrix(linear_out)]
        return weights

    def depformer_step_scales(self, step: int) -> list[torch.Tensor]:
        """With fp8 weights, the row scales of step `step`'s linears in the order the fused kernel
        reads them (per layer in_proj, out_proj, linear_in, linear_out); else none."""
        linears = self.depformer_step_layer_linears(step)
        return [linear.scales for linear in linears if isinstance(linear, Fp8Linear)]

    def depformer_step_fusable(self, step: int, activation_dtype: torch.dtype) -> bool:
        """Whether the fused kernel can read step `step`'s weights: the logits head a plain
        nn.Linear in the activations' dtype, the layers' linears all plain in that dtype or all
        fp8 (the other quantized formats' modules it cannot read)."""
        head = self.linears[step]
        linears = self.depformer_step_layer_linears(step)

        def plain(linear: nn.Module) -> bool:
            return type(linear) is nn.Linear and linear.weight.dtype == activation_dtype

        return plain(head) and (all(map(plain, linears)) or all(type(linear) is Fp8Linear for linear in linears))

    # ---- teacher-forced path

    def depformer_teacher_forced(self, hidden: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """All depformer steps at once: hidden [B, T, dim], inputs [B, num_codebooks, T]
        (step k reads stream k: the text for k = 0, else the codebook before it)
        -> logits [B, dep_q, T, card]."""
        batch, frames, _ = hidden.shape
        steps = []
        for k in range(self.config.dep_q):
            embedding = self.depformer_text_emb if k == 0 else self.depformer_emb[k - 1]
            steps.append(self.depformer_in[k](hidden) + embed_with_zero(embedding, inputs[:, k]))
        x = torch.stack(steps, dim=2).flatten(0, 1)  # [B*T, steps, ddim]
        for layer in self.depformer.layers:
            x = layer.forward_all(x)
        logits = torch.stack([self.linears[k](x[:, k]) for k in range(self.config.dep_q)], dim=1)
        return logits.unflatten(0, (batch, frames)).transpose(1, 2)

    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits for a whole sequence of aligned codes [B, num_codebooks, T].

        Returns (text_logits [B, 1, T, text_card], audio_logits [B, dep_q, T, card]), aligned
        with `codes` (position t predicts codes[..., t]); positions a delay makes unpredictable
        are NaN, as in upstream's training forward.
        """
        batch, _, frames = codes.shape
        start = self.start_tokens(codes.device)[None, :, None].expand(batch, -1, 1)
        delayed = torch.cat([start, delay_codes(codes, self.config.delays, start)], dim=2)
        hidden, text_logits = self.forward_temporal(self.embed_codes(delayed[:, :, :-1]))
        audio_logits = self.depformer_teacher_forced(hidden, delayed[:, :, 1:])
        audio_delays = self.config.delays[1 : 1 + self.config.dep_q]
        return undelay_logits(text_logits[:, None], self.config.delays[:1]), undelay_logits(audio_logits, audio_delays)


def delay_codes(codes: torch.Tensor, delays: tuple[int, ...], padding: torch.Tensor) -> torch.Tensor:
    """Shift stream k right by delays[k] frames, filling with `padding` [B, K, 1]."""
    out = codes.clone()
    for k, delay in enumerate(delays):
        if delay:
            out[:, k, delay:] = codes[:, k, :-delay]
            out[:, k, :delay] = padding[:, k]
    return out


def undelay_logits(logits: torch.Tensor, delays: tuple[int, ...]) -> torch.Tensor:
    """Shift logits [B, K, T, V] of stream k left by delays[k]; the tail becomes NaN."""
    out = torch.full_like(logits, float("nan"))
    for k, delay in enumerate(delays):
        out[:, k, : logits.shape[2] - delay] = logits[:, k, delay:]
    return out
