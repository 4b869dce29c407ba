"""A whole frame for B conversations in lockstep, replayed from one CUDA graph.

A frame is Mimi's streaming encode of the user's 1920 samples, one `FrameGenerator.step`
(temporal transformer over the KV ring, the 8 agent depformer steps, sampling, ring
bookkeeping) and Mimi's streaming decode of the agent's codes. Every piece already keeps
static shapes, updates its state in place and never synchronises with the host, so the
frame is captured once and then replayed: one launch per frame instead of ~2000.

The eager path (`use_graphs=False`, and always on CPU) runs the very same `_frame`, so the
two paths compute the same numbers; the graph only removes launch overhead.
"""

from __future__ import annotations

import torch

from ..model.layers import compile_elementwise
from ..model.lm import LMModel
from ..model.mimi import Mimi
from .generation import FrameGenerator, StepInputs
from .persona import PersonaSnapshot
from .sampling import SamplingConfig


class FastFrameRunner:
    """B conversation rows advanced together, one frame per `run`.

    Rows are joined from a cached persona (`join`) and left (`leave`) without touching the
    other rows. Rows nobody has joined still compute (lockstep, static shapes) but their
    output means nothing.
    """

    def __init__(self, engine_or_parts, batch_size: int, *, sampling: SamplingConfig | None = None,
                 seed: int = 0, use_graphs: bool | None = None, kv_dtype: torch.dtype | None = None):
        """`engine_or_parts`: a `PersonaPlex` engine or an `(lm, mimi)` pair; `kv_dtype`
        torch.float8_e4m3fn halves the KV cache (default: the activation dtype)."""
        lm, mimi = (engine_or_parts.lm, engine_or_parts.mimi) if hasattr(engine_or_parts, "lm") else engine_or_parts
        self.lm: LMModel = lm
        self.mimi: Mimi = mimi
        self.batch_size = batch_size
        self.generator = FrameGenerator(lm, batch_size, sampling, agent_only=True, seed=seed, kv_dtype=kv_dtype)
        self.codec_state = mimi.init_stream(batch_size)
        device = self.generator.device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs:
            # Fused norm / RoPE / gate kernels: once launches are gone, kernel count is the cost.
            compile_elementwise(True)
        self.agent_codebooks = lm.config.agent_codebooks
        samples = mimi.frame_samples
        # Static buffers: the graph reads and writes these addresses on every replay.
        self.user_pcm = torch.zeros(batch_size, 1, samples, device=device, dtype=mimi.dtype)
        self.user_codes = torch.zeros(batch_size, self.agent_codebooks, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch_size, 1 + self.agent_codebooks, dtype=torch.long, device=device)
        self.agent_pcm = torch.zeros(batch_size, 1, samples, device=device, dtype=torch.float32)
        self.active = [False] * batch_size
        self._graph: torch.cuda.CUDAGraph | None = None
        self._captured_top_k = (self.generator.max_text_top_k, self.generator.max_audio_top_k)

    # ---- rows

    @torch.no_grad()
    def join(self, row: int, persona: PersonaSnapshot, sampling: SamplingConfig | None = None,
             seed: int | None = None) -> None:
        """Start conversation `row` right after `persona`, with fresh Mimi streams and its own
        sampling stream (`seed`: the same seed gives the same conversation in any batch)."""
        persona.restore(self.generator, row)
        self.generator.noise.reseed(slice(row, row + 1), seed)
        self.codec_state.reset(self._row_mask(row))
        if sampling is not None:
            self.generator.set_sampling(sampling, rows=slice(row, row + 1))
            # top-k sizes are Python ints baked into the captured kernels: a larger one needs a new capture.
            if (self.generator.max_text_top_k, self.generator.max_audio_top_k) != self._captured_top_k:
                self._graph = None
                self._captured_top_k = (self.generator.max_text_top_k, self.generator.max_audio_top_k)
        self.active[row] = True

    def leave(self, row: int) -> None:
        """Free `row`: its history is dropped so nothing of the old conversation is kept."""
        mask = self._row_mask(row)
        self.generator.temporal.reset(mask)
        self.codec_state.reset(mask)
        self.active[row] = False

    def _row_mask(self, row: int) -> torch.Tensor:
        return torch.arange(self.batch_size, device=self.generator.device) == row

    # ---- the frame

    @torch.no_grad()
    def run(self, user_pcm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """user_pcm [B, 1920] -> (agent_pcm [B, 1920] float32, tokens [B, 9]: text + 8 agent codes).

        The returned tensors are the runner's static outputs: copy them before the next `run`.
        """
        self.user_pcm.copy_(user_pcm.view(self.user_pcm.shape))
        if not self.use_graphs:
            self._frame()
        elif self._graph is None:
            self._frame_then_capture()
        else:
            self._graph.replay()
        return self.agent_pcm[:, 0], self.tokens

    def _frame(self) -> None:
        self.encode_user()
        self.step_model()
        self.decode_agent()

    # The three parts of a frame, through the static buffers (the benchmark times them apart).

    def encode_user(self) -> None:
        self.user_codes.copy_(self.mimi.encode_step(self.user_pcm, self.codec_state)[:, :, 0])

    def step_model(self) -> None:
        self.tokens.copy_(self.generator.step(StepInputs(user=self.user_codes)).tokens)

    def decode_agent(self) -> None:
        # While a row's delays are still filling, its audio tokens are the start token (= card);
        # the clamp keeps such rows (and rows nobody joined) inside the codebook. Tokens of a
        # conversation restored from a persona are always in [0, card): for them it is a no-op.
        codes = self.tokens[:, 1:, None].clamp(0, self.lm.config.card - 1)
        self.agent_pcm.copy_(self.mimi.decode_step(codes, self.codec_state))

    def _frame_then_capture(self) -> None:
        """Run this frame eagerly on a side stream (which also warms up cuBLAS and the
        allocator, as capture requires), then capture the next frames' graph. Capturing runs
        nothing, so the state advances exactly once."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._frame()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._frame()
        self._graph = graph
