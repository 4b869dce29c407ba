"""The frame: B conversations advanced together, one frame per `run`, replayed from CUDA graphs.

A frame is three parts: Mimi's streaming encode of each row's 1920 microphone samples, one
`FrameGenerator.step` (temporal transformer over the KV ring, the 8 agent depformer steps,
sampling, ring bookkeeping) and Mimi's streaming decode of the agent's codes. Every part
keeps static shapes, updates its state in place and never synchronises with the host, so on
a GPU each part is captured once and then replayed: three launches per frame instead of ~2000.

Every call of the library, the CLI and the server runs its conversations through this one
frame (`FrameScheduler` drives it). The readable path is the same `_frame` run eagerly with
the readable kernels: what CPUs and Apple GPUs get, and what the fast path is tested against.

The fast path is that same `_frame`, each part compiled by torch.compile (as gpt-fast compiles
its decode step) and then captured in its CUDA graph. Compiling fuses the thousands of small
element-wise, copy and sampling kernels between the matrix products into a few hundred; the
graphs remove the launch cost of what is left. The parts are graphed apart so that frames
launched back to back (a recording, a backlog of live audio) overlap: Mimi's small, latency-
bound kernels of one frame run beside the LM's memory-bound products of the next
(`_launch_graphs`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch

from ..model.kernels import register_cuda_ops
from ..model.layers import READABLE_KERNELS, Kernels
from ..model.lm import LMModel
from ..model.mimi import Mimi
from ..model.quantize import is_depformer_layer, is_temporal_layer, use_int4_tensor_cores
from .generation import FrameGenerator, StepInputs
from .persona import SILENCE_CODES, TEXT_PAD, PersonaSnapshot
from .sampling import SamplingConfig

log = logging.getLogger(__name__)

# How Inductor compiles the frame (`FrameRunner(compile_tuning=...)`), as options of that one
# compilation, never process-wide. Every tuning launches independent element-wise kernels side
# by side as one ("combo kernels"): a frame ends with ~40 small state copies, each a launch of
# its own otherwise (one-row bf16 frame on an H200: 722 -> 664 kernels, 6.14 -> 6.07 ms graphed,
# docs/PERFORMANCE.md run S). "inductor": Inductor's own defaults, without that.
# "coordinate-descent": each fused kernel's block sizes and warps are timed against their
# neighbours (gpt-fast's setting for decoding). "max-autotune": that, plus Triton templates for
# the matrix products timed against cuBLAS at each shape, with the element-wise work after a
# product fused into it. The two tuned ones take minutes more to compile; `personaplex bench
# --compile-tuning` measures them.
_COMBO = {"combo_kernels": True}
COMPILE_TUNINGS: dict[str, dict[str, bool]] = {
    "default": _COMBO,
    "inductor": {},
    "coordinate-descent": {**_COMBO, "coordinate_descent_tuning": True},
    "max-autotune": {**_COMBO, "coordinate_descent_tuning": True, "max_autotune": True},
}


class FrameRunner:
    """B conversation rows advanced in lockstep.

    Rows join from a cached persona (`join`) and leave (`leave`) between frames without
    touching the other rows; each has its own sampling settings and random stream. Rows nobody
    has joined still compute (static shapes) but their output means nothing.
    """

    def __init__(self, lm: LMModel, mimi: Mimi, batch_size: int, *, kv_dtype: torch.dtype | None = None,
                 use_graphs: bool | None = None, compile_frame: bool | None = None, kernels: Kernels | None = None,
                 compile_tuning: str = "default"):
        """`kv_dtype` torch.float8_e4m3fn halves the KV cache (default: the activation dtype).
        `use_graphs` defaults to what the device does best: CUDA graphs on CUDA, the readable
        eager frame elsewhere. `compile_frame` (default: with graphs) compiles the frame before
        it is captured; the first frame then takes a minute or two of compilation (cached on
        disk by PyTorch for later processes). `kernels` default to `Kernels.fast()` with graphs
        (the Triton ring attention, fused depformer step, top-k and GEMV) and to the readable
        kernels without. `compile_tuning` is a key of
        `COMPILE_TUNINGS`."""
        if compile_tuning not in COMPILE_TUNINGS:
            raise ValueError(f"unknown compile tuning {compile_tuning!r}: one of {', '.join(COMPILE_TUNINGS)}")
        self.lm, self.mimi = lm, mimi
        self.batch_size = batch_size
        device = lm.text_linear.weight.device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.compile_frame = self.use_graphs if compile_frame is None else compile_frame
        self.kernels = kernels or (Kernels.fast() if self.use_graphs else READABLE_KERNELS)
        if device.type == "cuda":
            register_cuda_ops()  # before any frame is compiled: the compiler finds the ops registered
        if self.kernels.conv_products:
            mimi.keep_product_weights()
        if self.kernels.gemv:
            lm.stack_depformer_inputs()
        if 0 < self.kernels.int4_tensor_cores_from_rows <= batch_size:
            use_int4_tensor_cores(lm, is_temporal_layer)
        if 0 < self.kernels.int4_depformer_tensor_cores_from_rows <= batch_size:
            use_int4_tensor_cores(lm, is_depformer_layer)
        self.generator = FrameGenerator(lm, batch_size, agent_only=True, kv_dtype=kv_dtype, kernels=self.kernels)
        self.codec_state = mimi.init_stream(batch_size)
        agents = lm.config.agent_codebooks
        samples = mimi.frame_samples
        # Static buffers: the graph reads and writes these addresses on every replay.
        self.user_pcm = torch.zeros(batch_size, 1, samples, device=device, dtype=mimi.dtype)
        self.agent_listens = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.encoded_codes = torch.zeros(batch_size, agents, dtype=torch.long, device=device)  # encode's
        self.user_codes = torch.zeros(batch_size, agents, dtype=torch.long, device=device)  # the step's
        self.step_tokens = torch.zeros(batch_size, 1 + agents, dtype=torch.long, device=device)
        self.step_valid = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(batch_size, 1 + agents, dtype=torch.long, device=device)  # the frame's result
        self.valid = torch.zeros(batch_size, dtype=torch.bool, device=device)
        # Rows holding a conversation. A free row still computes (static shapes), but its
        # history is dropped every frame: otherwise it would fill its KV ring with frames
        # nobody hears and cost full-context attention in every later frame.
        self.joined = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.agent_pcm = torch.zeros(batch_size, 1, samples, device=device, dtype=torch.float32)
        # What a listening agent is held at: text PAD and the SILENCE codes, as in the persona.
        self._pad_text = torch.full((batch_size, 1), TEXT_PAD, dtype=torch.long, device=device)
        self._silence = torch.tensor(SILENCE_CODES, dtype=torch.long, device=device).expand(batch_size, -1)
        self._frame_graphs: _FrameGraphs | None = None
        self._last_done: torch.cuda.Event | None = None  # the last frame launched is done (CUDA)
        self._compiled_parts: tuple[Callable[[], None], ...] | None = None
        if self.compile_frame:
            # One compilation per part and runner shape (rows, weight format, KV format); a process
            # may hold several runners (tests, the benchmark), more than dynamo's default of 8 allows.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._compiled_parts = tuple(
                torch.compile(part, fullgraph=True, dynamic=False, options=COMPILE_TUNINGS[compile_tuning] or None)
                for part in self._graphed_parts())

    @property
    def device(self) -> torch.device:
        return self.generator.device

    # ---- rows

    @torch.no_grad()
    def join(self, row: int, persona: PersonaSnapshot, sampling: SamplingConfig | None = None,
             seed: int | None = None) -> None:
        """Start conversation `row` right after `persona`, with fresh Mimi streams and its own
        sampling stream (`seed`: the same seed gives the same conversation in any batch)."""
        self._settle()
        persona.restore(self.generator, row)
        self.joined[row] = True
        rows = slice(row, row + 1)
        self.generator.noise.reseed(rows, seed)
        self.generator.set_sampling(sampling or SamplingConfig(), rows=rows)
        self.codec_state.reset(self._row_mask(row))

    def leave(self, row: int) -> None:
        """Free `row`: its history is dropped so nothing of the old conversation is kept."""
        self._settle()
        mask = self._row_mask(row)
        self.joined[row] = False
        self.generator.temporal.reset(mask)
        self.codec_state.reset(mask)

    def _row_mask(self, row: int) -> torch.Tensor:
        return torch.arange(self.batch_size, device=self.device) == row

    # ---- the frame

    @torch.no_grad()
    def run(self, user_pcm: torch.Tensor, agent_listens: torch.Tensor) -> None:
        """Advance every row one frame: user_pcm [B, 1920] from the microphones; agent_listens
        [B] bool holds those rows' agent at silence (turn-based: the user is speaking).

        Results are left in the static buffers, valid until the next `run` (on CUDA, in the
        order of the current stream): `agent_pcm` [B, 1, 1920] float32, `tokens` [B, 9]
        (text + 8 agent codes), `valid` [B]."""
        done = self.launch(user_pcm, agent_listens)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    @torch.no_grad()
    def launch(self, user_pcm: torch.Tensor, agent_listens: torch.Tensor,
               results: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.cuda.Event | None:
        """Queue one frame (as `run`) without tying the caller's stream to it, so that the next
        frame can be launched while this one runs. `results` (host agent_pcm [B, 1920] float32,
        tokens [B, 9]) receive the frame's results. On CUDA returns the event after which they
        are there; elsewhere they are there already. The device may read the inputs after this
        returns: keep them unchanged until then (the scheduler uses two sets of pinned buffers
        in turn)."""
        if self._frame_graphs is not None:
            return self._launch_graphs(user_pcm, agent_listens, results)
        self.user_pcm.copy_(user_pcm.view(self.user_pcm.shape), non_blocking=True)
        self.agent_listens.copy_(agent_listens, non_blocking=True)
        if self.use_graphs:
            self._frame_then_capture()
        else:
            self._frame()
        if results is not None:
            self._copy_results(results)
        if self.device.type != "cuda":
            return None
        self._last_done = _recorded(torch.cuda.current_stream(self.device))
        return self._last_done

    def _frame(self) -> None:
        """The frame in order: each part, then the hand-off of its results to the next part."""
        self._run_part(0)
        self.take_user_codes()
        self._run_part(1)
        self.publish_step()
        self._run_part(2)

    def parts(self) -> dict[str, Callable[[], None]]:
        """The frame as written, in order, in the three parts the benchmark and the diagnostics
        time apart (the LM's holds the hand-offs around its step)."""
        def lm() -> None:
            self.take_user_codes()
            self.step_model()
            self.publish_step()

        return {"encode": self.encode_user, "lm": lm, "decode": self.decode_agent}

    def _graphed_parts(self) -> tuple[Callable[[], None], ...]:
        """The parts as written that are compiled and each captured in a graph, in order."""
        return self.encode_user, self.step_model, self.decode_agent

    def _run_part(self, index: int) -> None:
        """Part `index` of the frame (encode, step, decode), compiled if asked. If compiling fails
        (no working Triton or C compiler, an operator the compiler lacks) every part runs as
        written from then on: slower, but the same results. Compilation finishes before any of
        the part's kernels runs, so no state has moved."""
        eager = self._graphed_parts()[index]
        if self._compiled_parts is None:
            eager()
            return
        try:
            self._compiled_parts[index]()
        except Exception as error:  # noqa: BLE001 - any compiler failure leaves the eager frame
            if self._frame_graphs is not None or not _is_compile_error(error):
                raise
            log.warning("compiling the frame failed (%s); running it uncompiled", str(error).splitlines()[0][:200])
            self._compiled_parts = None
            eager()

    # The frame's parts and hand-offs, through the static buffers. The three parts are what the
    # graphs hold (and what the benchmark and the diagnostics time apart); a hand-off copies one
    # part's results to the next part's inputs, so that each part's buffers are its own and
    # the next frame's encode may run beside this frame's step.

    def encode_user(self) -> None:
        self.encoded_codes.copy_(self.mimi.encode_step(self.user_pcm, self.codec_state, self.kernels)[:, :, 0])

    def take_user_codes(self) -> None:
        self.user_codes.copy_(self.encoded_codes)

    def step_model(self) -> None:
        """The one place that decides what is forced: the user's codes always, the agent's
        text and audio in listening rows."""
        self.generator.temporal.reset(~self.joined)
        self.step_valid.copy_(self.generator.valid())
        inputs = StepInputs(user=self.user_codes, text=self._pad_text, agent=self._silence,
                            agent_rows=self.agent_listens)
        self.step_tokens.copy_(self.generator.step(inputs))

    def publish_step(self) -> None:
        self.tokens.copy_(self.step_tokens)
        self.valid.copy_(self.step_valid)

    def decode_agent(self) -> None:
        """Every row is decoded (static shapes). A frame that is not valid (only a row that
        never joined a persona has one) holds start tokens: its codes are clamped into the
        codebook for the decoder and its audio is silence."""
        codes = self.tokens[:, 1:, None].clamp(0, self.lm.config.card - 1)
        decoded = self.mimi.decode_step(codes, self.codec_state, self.kernels)
        self.agent_pcm.copy_(torch.where(self.valid[:, None, None], decoded, torch.zeros((), device=self.device)))

    def _copy_results(self, results: tuple[torch.Tensor, torch.Tensor]) -> None:
        agent_pcm, tokens = results
        asynchronous = self.device.type == "cuda"
        agent_pcm.copy_(self.agent_pcm[:, 0], non_blocking=asynchronous)
        tokens.copy_(self.tokens, non_blocking=asynchronous)

    # ---- the graphs

    def _frame_then_capture(self) -> None:
        """Run this frame in order on a side stream (which also warms up cuBLAS, the compiled
        kernels and the allocator, as capture requires), then capture each part's graph for
        the next frames. Capturing runs nothing, so the state advances exactly once. Each
        graph has its own memory pool: the parts of neighbouring frames run side by side."""
        started = time.perf_counter()
        if self._compiled_parts is not None:  # a wait of minutes should not look like a hang
            log.info("compiling the frame for %d rows: a minute or two the first time on this machine "
                     "(PyTorch keeps the result in its on-disk cache for later processes)", self.batch_size)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._frame()
        torch.cuda.current_stream().wait_stream(side)
        # Each part is captured on the stream it is replayed on: cuBLAS keeps a workspace per
        # stream, and a graph keeps the one of the stream it was captured on. Captured on one
        # stream, the parts would share it and overwrite each other's when they overlap.
        streams = [torch.cuda.Stream() for _ in range(3)]
        graphs = []
        for index, stream in enumerate(streams):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self._run_part(index)
            graphs.append(graph)
        self._frame_graphs = _FrameGraphs(*graphs, *streams)
        log.info("the %d-row frame's parts are %s and captured as CUDA graphs (%.1f s)", self.batch_size,
                 "compiled" if self._compiled_parts is not None else "not compiled", time.perf_counter() - started)

    def _launch_graphs(self, user_pcm: torch.Tensor, agent_listens: torch.Tensor,
                       results: tuple[torch.Tensor, torch.Tensor] | None) -> torch.cuda.Event:
        """Replay the three parts on three streams, ordered by events, so that frames launched
        back to back overlap on the device: the next frame's encode runs beside this frame's
        step, this frame's decode beside the next step (Mimi then costs the frames a fraction
        of its time). Each part waits for what it reads and for nobody else:

            encode (t):   the caller's stream; step (t-1) has taken the previous codes
            step (t):     the caller's stream; encode (t); then, before it publishes its tokens,
                          decode (t-1) and its results' copy are done with the previous ones
            decode (t):   the caller's stream; step (t) has published
        """
        graphs = self._frame_graphs
        # The caller's stream so far: joins, leaves, its inputs, its reads of earlier results.
        ready = _recorded(torch.cuda.current_stream(self.device))
        # Inputs on the device are read on other streams than the caller's: their memory must not
        # go back to the caller's stream before those reads (PyTorch's allocator is told so).
        for tensor, stream in ((user_pcm, graphs.encode_stream), (agent_listens, graphs.step_stream)):
            if tensor.is_cuda:
                tensor.record_stream(stream)
        with torch.cuda.stream(graphs.encode_stream):
            _wait(graphs.encode_stream, ready, graphs.codes_taken)
            self.user_pcm.copy_(user_pcm.view(self.user_pcm.shape), non_blocking=True)
            graphs.encode.replay()
            encoded = _recorded(graphs.encode_stream)
        with torch.cuda.stream(graphs.step_stream):
            _wait(graphs.step_stream, ready, encoded)
            self.agent_listens.copy_(agent_listens, non_blocking=True)
            self.take_user_codes()
            graphs.codes_taken = _recorded(graphs.step_stream)
            graphs.step.replay()
            _wait(graphs.step_stream, self._last_done)
            self.publish_step()
            published = _recorded(graphs.step_stream)
        with torch.cuda.stream(graphs.decode_stream):
            _wait(graphs.decode_stream, ready, published)
            graphs.decode.replay()
            if results is not None:
                self._copy_results(results)
            done = _recorded(graphs.decode_stream)
        self._last_done = done
        return done

    def _settle(self) -> None:
        """Make the caller's stream wait for the frames in flight (before it changes a row's state)."""
        if self._last_done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_done)


@dataclasses.dataclass
class _FrameGraphs:
    """The frame's parts captured as graphs, and the streams they are replayed on."""

    encode: torch.cuda.CUDAGraph
    step: torch.cuda.CUDAGraph
    decode: torch.cuda.CUDAGraph
    encode_stream: torch.cuda.Stream
    step_stream: torch.cuda.Stream
    decode_stream: torch.cuda.Stream
    codes_taken: torch.cuda.Event | None = None  # the last step has copied the encoded codes


def _recorded(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _wait(stream: torch.cuda.Stream, *events: torch.cuda.Event | None) -> None:
    for event in events:
        if event is not None:
            stream.wait_event(event)


def _is_compile_error(error: Exception) -> bool:
    """torch.compile's own failures (tracing, lowering, kernel compilation), not the model's."""
    return isinstance(error, torch._dynamo.exc.TorchDynamoException) or type(error).__module__.startswith("torch._inductor")
