"""Many full-duplex conversations on one GPU: every live conversation advances in one batched frame.

Each conversation holds one row of a `FastFrameRunner` (one CUDA graph per frame on a GPU).
A worker thread runs a frame ("tick") as soon as every live row has a microphone frame
waiting, or when the oldest waiting frame has waited `max_wait_s`: a row still without
input then gets a frame of silence, counted in `late_frames`, so that one slow client
cannot stall the others. This is the clock a real-time server needs anyway; with clients
that keep up, every conversation gets exactly one agent frame per microphone frame.

Rows join between ticks from a cached persona and leave when their conversation ends,
without touching the other rows.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..audio.io import model_rate_frames
from ..errors import PersonaPlexError
from .fast import FastFrameRunner
from .persona import PersonaSnapshot
from .sampling import SamplingConfig


class NoFreeRowError(PersonaPlexError):
    """Every row of the batch holds a conversation."""


@dataclass
class _Row:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    inputs: deque = field(default_factory=deque)  # [frame_samples] float32 frames
    oldest_wait: float | None = None  # monotonic time the oldest queued frame arrived
    started: bool = False  # a row takes part in frames from its first microphone frame on


@dataclass
class FrameOut:
    pcm: np.ndarray
    text_token: int
    agent_codes: list[int]
    elapsed_ms: float


class LockstepBatcher:
    def __init__(self, engine, rows: int, *, kv_dtype: torch.dtype | None = None, max_wait_s: float = 0.08,
                 use_graphs: bool | None = None):
        self.engine = engine
        self.runner = FastFrameRunner(engine, rows, kv_dtype=kv_dtype, use_graphs=use_graphs)
        self.frame_samples = engine.frame_samples
        self.max_wait_s = max_wait_s
        self._rows: list[_Row | None] = [None] * rows
        self._pending_joins: dict[int, tuple[PersonaSnapshot, SamplingConfig, int | None]] = {}
        self._pending_leaves: set[int] = set()
        self._changed = threading.Condition()
        self.late_frames = 0
        self.ticks = 0
        self._worker = threading.Thread(target=self._run, name="personaplex-lockstep", daemon=True)
        self._worker.start()

    @property
    def capacity(self) -> int:
        return len(self._rows)

    @property
    def live_rows(self) -> int:
        with self._changed:
            return sum(row is not None for row in self._rows)

    # ---- one conversation (called on the asyncio loop)

    async def conversation(self, mic_frames: AsyncIterator[np.ndarray], persona: PersonaSnapshot,
                           sampling: SamplingConfig, sample_rate: int, seed: int | None = None) -> AsyncIterator[FrameOut]:
        """One agent frame out per tick of this row; stops when the input ends or the consumer stops."""
        row_index, row = self._claim(persona, sampling, seed)
        feeder = asyncio.create_task(self._feed(row_index, row, mic_frames, sample_rate))
        try:
            while True:
                item = await row.outputs.get()
                if item is None:  # the input ended and every frame of it has been answered
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            feeder.cancel()
            self._release(row_index)

    async def _feed(self, row_index: int, row: _Row, mic_frames: AsyncIterator[np.ndarray], sample_rate: int) -> None:
        try:
            async for frame in model_rate_frames(mic_frames, sample_rate, self.frame_samples):
                self._submit(row, frame)
            self._submit(row, None)
        except Exception as err:  # bad audio: end this conversation with the error, not the worker
            row.outputs.put_nowait(err)

    def _submit(self, row: _Row, frame: np.ndarray | None) -> None:
        with self._changed:
            row.started = True
            if not row.inputs:
                row.oldest_wait = time.monotonic()
            row.inputs.append(frame)
            self._changed.notify()

    def _claim(self, persona: PersonaSnapshot, sampling: SamplingConfig, seed: int | None) -> tuple[int, _Row]:
        with self._changed:
            for index, current in enumerate(self._rows):
                if current is None:
                    row = _Row(loop=asyncio.get_running_loop(), outputs=asyncio.Queue())
                    self._rows[index] = row
                    self._pending_leaves.discard(index)  # the join resets the row anyway
                    self._pending_joins[index] = (persona, sampling, seed)
                    self._changed.notify()
                    return index, row
        raise NoFreeRowError(f"all {self.capacity} conversation slots of the batch are taken: try again later")

    def _release(self, row_index: int) -> None:
        with self._changed:
            self._rows[row_index] = None
            self._pending_joins.pop(row_index, None)
            self._pending_leaves.add(row_index)
            self._changed.notify()

    # ---- the worker thread

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(self._tick_due, timeout=self.max_wait_s)
                if not self._tick_due():
                    continue
                live = [(i, row) for i, row in enumerate(self._rows) if row is not None and row.started]
                # A row joins (its persona is restored) at its first frame, not before: until then
                # the lockstep frames would advance its state on no input.
                joins = {i: self._pending_joins.pop(i) for i, _ in live if i in self._pending_joins}
                leaves, self._pending_leaves = self._pending_leaves, set()
                frames = {i: self._next_input(row) for i, row in live}
            # The engine's lock: persona prefills and unbatched conversations share the model.
            with self.engine.compute_lock:
                self._apply(joins, leaves)
                self._tick(live, frames)

    def _tick_due(self) -> bool:
        """A frame runs when every live row has input waiting, or the oldest input is overdue."""
        live = [row for row in self._rows if row is not None and row.started]
        waiting = [row for row in live if row.inputs]
        if not waiting:
            return False
        if len(waiting) == len(live):
            return True
        oldest = min(row.oldest_wait for row in waiting)
        return time.monotonic() - oldest >= self.max_wait_s

    def _next_input(self, row: _Row) -> np.ndarray | None | bool:
        """The row's next frame; None when its input ended; False when it has none yet (late)."""
        if not row.inputs:
            return False
        frame = row.inputs.popleft()
        row.oldest_wait = time.monotonic() if row.inputs else None
        return frame

    def _apply(self, joins: dict[int, tuple[PersonaSnapshot, SamplingConfig, int | None]], leaves: set[int]) -> None:
        for index in leaves:
            if index not in joins:
                self.runner.leave(index)
        for index, (persona, sampling, seed) in joins.items():
            self.runner.join(index, persona, sampling, seed)

    def _tick(self, live: list[tuple[int, _Row]], frames: dict[int, np.ndarray | None | bool]) -> None:
        user_pcm = torch.zeros(self.capacity, self.frame_samples)
        for index, _ in live:
            frame = frames[index]
            if frame is False:
                self.late_frames += 1  # this row's client is late: it hears silence this frame
            elif frame is not None:
                user_pcm[index] = torch.from_numpy(frame)
        started = time.perf_counter()
        try:
            agent_pcm, tokens = self.runner.run(user_pcm.to(self.runner.user_pcm.device))
            agent_pcm, tokens = agent_pcm.float().cpu().numpy(), tokens.cpu().tolist()
        except Exception as err:  # a failed frame ends every live conversation with the error
            for _, row in live:
                _deliver(row, err)
            return
        elapsed_ms = (time.perf_counter() - started) * 1e3
        self.ticks += 1
        for index, row in live:
            ended = frames[index] is None
            _deliver(row, None if ended else FrameOut(agent_pcm[index].copy(), tokens[index][0], tokens[index][1:], elapsed_ms))


def _deliver(row: _Row, item: object) -> None:
    """Hand a frame to its conversation's event loop; a loop that has closed (its conversation
    is gone) must not take the worker down with it."""
    try:
        row.loop.call_soon_threadsafe(row.outputs.put_nowait, item)
    except RuntimeError:
        pass
