"""Frame-by-frame generation: the token ring buffer, delays, forcing and sampling.

This is the reference `LMGen` state machine (NVIDIA/personaplex `moshi/models/lm.py`),
with one difference in form: every batch row has its own `offset`, so conversations that
joined at different times can run in one batch.

The ring holds `max_delay + 3` frames of the 17 token streams, with a "provided" flag per
slot. Provided tokens (user audio, prompts) are written at `offset + delay`. A step reads
slot `offset - 1` as the transformer input and predicts slot `offset`; sampled tokens are
written only where nothing was provided; the frame returned is read at
`offset - 1 + delay`, so acoustic codebooks (delay 1) come out one frame late.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..model.layers import READABLE_KERNELS, Kernels
from ..model.lm import UNGENERATED_TOKEN, LMModel
from .sampling import RowNoise, SamplingConfig, sample_tokens


@dataclass
class TokenRing:
    tokens: torch.Tensor  # [B, streams, slots] int64
    provided: torch.Tensor  # [B, streams, slots] bool
    offset: torch.Tensor  # [B] int64: the frame being predicted

    @classmethod
    def empty(cls, batch_size: int, streams: int, slots: int, device) -> "TokenRing":
        return cls(
            tokens=torch.full((batch_size, streams, slots), UNGENERATED_TOKEN, dtype=torch.long, device=device),
            provided=torch.zeros((batch_size, streams, slots), dtype=torch.bool, device=device),
            offset=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    @property
    def slots(self) -> int:
        return self.tokens.shape[2]

    def slot(self, shift: int | torch.Tensor = 0) -> torch.Tensor:
        """Ring slot [B, 1] (or [B, streams] for a per-stream shift) of `offset + shift`."""
        if isinstance(shift, torch.Tensor):
            return (self.offset[:, None] + shift[None, :]) % self.slots
        return ((self.offset + shift) % self.slots)[:, None]

    def read(self, slots: torch.Tensor, streams: slice = slice(None)) -> torch.Tensor:
        """Tokens at per-row slots [B, 1] or per-(row, stream) slots [B, S] -> [B, S]."""
        view = self.tokens[:, streams]
        return view.gather(2, slots.expand(-1, view.shape[1])[..., None])[..., 0]

    def read_provided(self, slots: torch.Tensor, streams: slice = slice(None)) -> torch.Tensor:
        view = self.provided[:, streams]
        return view.gather(2, slots.expand(-1, view.shape[1])[..., None])[..., 0]

    def clear_provided(self, slots: torch.Tensor) -> None:
        """Drop the provided flags of every stream at per-row slots [B, 1]."""
        self.provided.scatter_(2, slots[..., None].expand(-1, self.provided.shape[1], 1), False)

    def write(self, streams: slice, slots: torch.Tensor, values: torch.Tensor, provided: bool | None,
              rows: torch.Tensor | None = None) -> None:
        """tokens[b, streams, slots[b, s]] = values[b, s]; optionally set the provided flags.

        `rows` [B] bool limits the write to those rows (the others keep what they hold)."""
        index = slots[..., None]
        if rows is not None:
            values = torch.where(rows[:, None], values, self.read(slots, streams))
        self.tokens[:, streams].scatter_(2, index, values[..., None])
        if provided is not None:
            flags = torch.full_like(index, provided, dtype=torch.bool)
            if rows is not None:
                flags = torch.where(rows[:, None, None], flags, self.read_provided(slots, streams)[..., None])
            self.provided[:, streams].scatter_(2, index, flags)


@dataclass
class StepInputs:
    """Tokens provided for one frame; None streams are left to the model. Each [B, n] int64."""

    text: torch.Tensor | None = None  # [B, 1]
    agent: torch.Tensor | None = None  # [B, 8]
    user: torch.Tensor | None = None  # [B, 8]
    # [B] bool: the rows `text` and `agent` are provided for (None: every row). A batch mixes
    # rows whose agent speaks with rows held at silence while their user speaks.
    agent_rows: torch.Tensor | None = None


class StepObserver(Protocol):
    """Sees the tensors of every step as they are made (diagnostics)."""

    def on_temporal(self, hidden: torch.Tensor, text_logits: torch.Tensor) -> None: ...

    def on_audio_logits(self, step: int, logits: torch.Tensor) -> None: ...


class FrameGenerator:
    """Generation state for a batch of conversations in lockstep, and the step that advances it.

    `agent_only` runs the 8 agent depformer steps only: steps 8-15 predict the user's audio,
    which inference always replaces with the real user tokens, so skipping them changes
    nothing but the RNG consumption.
    """

    def __init__(self, lm: LMModel, batch_size: int = 1, sampling: SamplingConfig | None = None,
                 agent_only: bool = True, seed: int | None = None, kv_dtype: torch.dtype | None = None,
                 kernels: Kernels = READABLE_KERNELS):
        self.lm = lm
        config = lm.config
        self.device = lm.text_linear.weight.device
        self.batch_size = batch_size
        self.depformer_steps = config.agent_codebooks if agent_only else config.dep_q
        self.delays = torch.tensor(config.delays, dtype=torch.long, device=self.device)
        self.start = lm.start_tokens(self.device)
        self.ring = TokenRing.empty(batch_size, config.num_codebooks, config.max_delay + 3, self.device)
        self.temporal = lm.new_temporal_state(batch_size, dtype=kv_dtype)
        self.depformer_state = lm.new_depformer_state(batch_size)
        self.noise = RowNoise(batch_size, self.device)
        self.noise.reseed(slice(None), seed)
        shape = (batch_size,)
        self.text_temperature = torch.empty(shape, device=self.device)
        self.text_top_k = torch.empty(shape, dtype=torch.long, device=self.device)
        self.audio_temperature = torch.empty(shape, device=self.device)
        self.audio_top_k = torch.empty(shape, dtype=torch.long, device=self.device)
        self.set_sampling(sampling or SamplingConfig())
        self.kernels = kernels
        self.observer: StepObserver | None = None

    # ---- settings

    def set_sampling(self, sampling: SamplingConfig, rows: torch.Tensor | slice = slice(None)) -> None:
        scale = 0.0 if sampling.greedy else 1.0
        self.text_temperature[rows] = sampling.text_temperature * scale
        self.audio_temperature[rows] = sampling.audio_temperature * scale
        self.text_top_k[rows] = sampling.text_top_k
        self.audio_top_k[rows] = sampling.audio_top_k

    # ---- the reference's prepare_step_input

    def _provide(self, inputs: StepInputs) -> None:
        agents = self.lm.config.agent_codebooks
        for first, values, rows in ((0, inputs.text, inputs.agent_rows), (1, inputs.agent, inputs.agent_rows),
                                    (1 + agents, inputs.user, None)):
            if values is None:
                continue
            streams = slice(first, first + values.shape[1])
            self.ring.write(streams, self.ring.slot(self.delays[streams]), values, provided=True, rows=rows)
        # Until a stream's delay has passed, its slot holds the start token.
        at_start = self.ring.offset[:, None] <= self.delays[None, :]  # [B, streams]
        slots = self.ring.slot().expand(-1, self.delays.shape[0])
        current = self.ring.read(slots)
        self.ring.write(slice(None), slots, torch.where(at_start, self.start[None, :], current), provided=None)
        flags = self.ring.read_provided(slots) | at_start
        self.ring.provided.scatter_(2, slots[..., None], flags[..., None])

    def begin(self, inputs: StepInputs = StepInputs()) -> None:
        """The step at offset 0 of every row: it only fills slot 0 with start tokens (no forward)."""
        if bool((self.ring.offset != 0).any()):
            raise RuntimeError("begin() is for conversations at offset 0")
        self._provide(inputs)
        self.ring.tokens[:, :, 0] = self.start
        self.ring.offset += 1

    def prepare(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Provide this frame's tokens; return (model input [B, streams], target, provided) at the
        input slot `offset - 1` and the target slot `offset`."""
        self._provide(inputs)
        model_input = self.ring.read(self.ring.slot(-1))
        target = self.ring.read(self.ring.slot())
        provided = self.ring.read_provided(self.ring.slot())
        return model_input, target, provided

    # ---- the step

    def valid(self) -> torch.Tensor:
        """[B] bool: whether the next step's frame is a real one (False while the delays fill)."""
        return self.ring.offset > self.lm.config.max_delay

    def step(self, inputs: StepInputs = StepInputs(), embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Advance every row by one frame; returns the frame's tokens [B, 1 + depformer steps]
        (text, then the audio codebooks, aligned in time). `embeddings` [B, 1, dim] replaces
        the token input (voice-prompt replay), as the reference's `step_embeddings`."""
        model_input, target, provided = self.prepare(inputs)
        if embeddings is None:
            embeddings = self.lm.embed_codes(model_input[:, :, None])
        hidden, text_logits = self.lm.forward_temporal(embeddings, self.temporal, self.kernels)
        if self.observer is not None:
            self.observer.on_temporal(hidden[:, -1], text_logits[:, -1])
        return self._finish_step(hidden, text_logits[:, -1], target, provided)

    def _finish_step(self, hidden: torch.Tensor, text_logits: torch.Tensor, target: torch.Tensor,
                     provided: torch.Tensor) -> torch.Tensor:
        sampled_text = sample_tokens(text_logits, self.text_temperature, self.text_top_k, self.noise, self.kernels)
        text_token = torch.where(provided[:, 0], target[:, 0], sampled_text)
        sampled_audio = self._run_depformer(hidden, text_token, target[:, 1:], provided[:, 1:])
        generated = torch.cat([sampled_text[:, None], sampled_audio], dim=1)
        self._store(generated)
        return self._advance()

    def _run_depformer(self, hidden, text_token, audio_target, audio_provided) -> torch.Tensor:
        projections = self.lm.depformer_projections(hidden, self.kernels)
        steps = self.depformer_steps
        if self.lm.depformer_frame_fusable(steps, hidden, self.kernels):
            # Every step and its draw in one launch: the same tokens as the loop below.
            sampled, logits = self.lm.fused_depformer_frame(
                steps, hidden, text_token, self.depformer_state, projections, self.audio_temperature,
                self.audio_top_k, self.noise.next_keys(steps), audio_target, audio_provided)
            if self.observer is not None:
                for step in range(steps):
                    self.observer.on_audio_logits(step, logits[step])
            return sampled
        previous = text_token
        sampled = []
        for step in range(self.depformer_steps):
            logits = self.lm.depformer_step(step, hidden, previous, self.depformer_state, self.kernels, projections)
            if self.observer is not None:
                self.observer.on_audio_logits(step, logits)
            token = sample_tokens(logits, self.audio_temperature, self.audio_top_k, self.noise, self.kernels)
            sampled.append(token)
            # Provided tokens (prompts, the user's audio) are forced as the next step's input.
            previous = torch.where(audio_provided[:, step], audio_target[:, step], token)
        return torch.stack(sampled, dim=1)

    def _store(self, generated: torch.Tensor) -> None:
        """Write sampled tokens [B, 1 + steps] at the target slot, where nothing was provided."""
        streams = slice(0, generated.shape[1])
        target_slots = self.ring.slot().expand(-1, generated.shape[1])
        self.ring.clear_provided(self.ring.slot(-1))
        current = self.ring.read(target_slots, streams)
        still_provided = self.ring.read_provided(target_slots, streams)
        self.ring.write(streams, target_slots, torch.where(still_provided, current, generated), provided=None)

    def _advance(self) -> torch.Tensor:
        streams = 1 + self.depformer_steps
        out_slots = self.ring.slot(self.delays[:streams] - self.lm.config.max_delay)
        tokens = self.ring.read(out_slots, slice(0, streams))
        self.ring.offset += 1
        return tokens

    # ---- prompt frames without the depformer

    def provide_prompt_frame(self, inputs: StepInputs, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """The ring bookkeeping of one prompt frame, without running the model: returns the
        frame's transformer input [B, 1, dim], for the caller to run many frames in one forward.

        Every stream must be provided: then nothing sampled would ever be stored, and skipping
        the depformer and sampling leaves exactly the state the stepwise path leaves.
        """
        model_input, _, provided = self.prepare(inputs)
        if not bool(provided.all()):
            raise ValueError("a prompt frame must provide every stream")
        self.ring.clear_provided(self.ring.slot(-1))
        self.ring.offset += 1
        if embedding is not None:
            return embedding.expand(self.batch_size, -1, -1)
        return self.lm.embed_codes(model_input[:, :, None])
