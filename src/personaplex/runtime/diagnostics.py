"""What `respond_diagnostic` reports: per-frame hidden-state statistics, entropies, timings."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..model.lm import LMModel
from .frames import AudioChunk
from .generation import FrameGenerator


@dataclass
class LayerStats:
    mean: float
    std: float
    max_abs: float


@dataclass
class FrameDiagnostics:
    index: int
    phase: str  # "listen" (the user speaks) or "reply"
    layers: list[LayerStats]  # one per temporal layer, of its output for this frame
    text_entropy: float  # nats, of the text distribution before sampling
    audio_entropy: float  # nats, mean over the agent codebooks' distributions
    text: str
    non_finite: bool  # a NaN or Inf anywhere in this frame's hidden states or logits
    timings_ms: dict[str, float]  # encode, lm, decode


@dataclass
class DiagnosticInfo:
    frames: list[FrameDiagnostics] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def has_non_finite(self) -> bool:
        return any(f.non_finite for f in self.frames)



def _entropy(logits: torch.Tensor) -> float:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return float(-(log_probs.exp() * log_probs).sum(dim=-1).mean())


class DiagnosticRecorder:
    """Forward hooks on the temporal layers and a step observer, read back once per frame
    (row 0 of an eager runner: hooks do not run inside a CUDA graph replay)."""

    def __init__(self, lm: LMModel):
        self.lm = lm
        self.info = DiagnosticInfo()
        self._layer_outputs: list[torch.Tensor] = []
        self._audio_entropies: list[float] = []
        self._text_logits: torch.Tensor | None = None

    @contextlib.contextmanager
    def attached(self, generator: FrameGenerator) -> Iterator[None]:
        handles = [layer.register_forward_hook(self._on_layer) for layer in self.lm.transformer.layers]
        generator.observer = self
        try:
            yield
        finally:
            generator.observer = None
            for handle in handles:
                handle.remove()

    def on_temporal(self, hidden: torch.Tensor, text_logits: torch.Tensor) -> None:
        self._text_logits = text_logits[:1]

    def on_audio_logits(self, step: int, logits: torch.Tensor) -> None:
        self._audio_entropies.append(_entropy(logits[:1]))

    def _on_layer(self, module, args, output: torch.Tensor) -> None:
        self._layer_outputs.append(output[:1, -1].detach().float())

    def add_phase(self, name: str, seconds: float) -> None:
        self.info.phase_seconds[name] = self.info.phase_seconds.get(name, 0.0) + seconds

    def add_frame(self, chunk: AudioChunk, phase: str, timings_ms: dict[str, float]) -> None:
        layers = [LayerStats(float(h.mean()), float(h.std()), float(h.abs().max())) for h in self._layer_outputs]
        non_finite = any(not torch.isfinite(h).all() for h in self._layer_outputs)
        text_logits = self._text_logits if self._text_logits is not None else torch.zeros(1, 1)
        non_finite |= not bool(torch.isfinite(text_logits).all())
        self.info.frames.append(
            FrameDiagnostics(
                index=len(self.info.frames), phase=phase, layers=layers,
                text_entropy=_entropy(text_logits),
                audio_entropy=sum(self._audio_entropies) / max(len(self._audio_entropies), 1),
                text=chunk.text, non_finite=non_finite, timings_ms=timings_ms,
            )
        )
        for part, milliseconds in timings_ms.items():
            self.add_phase(part, milliseconds / 1e3)
        self._layer_outputs.clear()
        self._audio_entropies.clear()

    def finish(self) -> DiagnosticInfo:
        return self.info
