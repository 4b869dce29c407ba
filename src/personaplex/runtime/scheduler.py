"""Every conversation is a row of one batched frame: the scheduler decides when a frame runs.

A worker thread owns the `FrameRunner`. Conversations open a row (`open`), push microphone
frames into it and read agent frames out, one per frame pushed. Two kinds of rows share it:

- paced rows (live microphones: `respond_realtime`, the server) get their frames in real
  time, each client on its own clock. A frame runs as soon as every live row has one
  waiting, which lines the frames up with the last client's phase. When the oldest waiting
  paced frame has waited `max_wait_s`, the rows still without input hear silence for that
  frame and stop holding the others back until their audio comes again: one stalled client
  costs the others one wait, not their real-time rate. Audio that comes after its frame ran
  is not thrown away but heard a frame later, and the frames of silence it caused count in
  `late_frames` then. A client that stopped sending (and has not hung up yet) hears
  silence too, but none of it is late: none of its audio was missing. `max_wait_s` is two
  frame periods: with clients on random phases a frame waits for the last one's audio, so
  the oldest waiting frame has usually waited most of a period already; the second period
  is the slack left for a client's audio to come late (network jitter, a busy host) before
  it counts as late;
- unpaced rows (recordings: `respond`, `respond_stream`, `respond_duplex`) have all their
  frames from the start, so alone they run as fast as the device allows, and beside live
  rows they simply keep pace.

A row joins its persona at the first frame it has input for, so nothing runs for it before
its user's first frame, and leaves between frames when its input ends or its reader stops,
without touching the other rows. Model work is serialised with everything else that uses
the model (persona prefills, diagnostics) by the engine's compute lock.

On CUDA a frame is launched without waiting for it: its inputs go up and its outputs come back
through pinned host buffers, and an event says when they are there. When the frame is a graph
replay and the next frame is already due (queued recordings, a backlog of live audio), the
worker launches it before it waits for the one in flight, so the device goes from one frame
straight to the next while the host hands the previous frame's results out, and the frames'
parts overlap there (`FrameRunner.launch`: the next frame's Mimi encode beside this frame's LM
step, this frame's decode beside the next step). One conversation on an H200
(docs/PERFORMANCE.md, run V): `respond_duplex` 5.58 ms a frame against 6.21 for a frame
launched and waited for alone. A frame that is not due yet is never waited for: the one in
flight is delivered first, so a live reply is never held back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import PersonaPlexError
from ..text.tokenizer import TextTokenizer
from .frames import AudioChunk, chunk_of
from .persona import PersonaSnapshot
from .runner import FrameRunner
from .sampling import SamplingConfig

RECENT_FRAMES = 1000  # frame times kept for the statistics
Delivery = Callable[[AudioChunk | BaseException | None], None]  # a frame, an error, or None: the end


class NoFreeRowError(PersonaPlexError):
    """Every row of the batch holds a conversation."""


@dataclass
class _Row:
    deliver: Delivery
    paced: bool
    persona: PersonaSnapshot
    sampling: SamplingConfig
    seed: int | None
    inputs: deque = field(default_factory=deque)  # (pcm [frame_samples] float32, agent listens)
    oldest_wait: float | None = None  # monotonic time the oldest queued frame arrived
    joined: bool = False  # the runner row holds this conversation (from its first input on)
    silent_frames: int = 0  # frames run with silence in place of this row's audio since its last input
    input_ended: bool = False
    closed: bool = False  # the reader stopped: leave at the next frame
    frames_done: int = 0
    in_flight: int = 0  # frames launched for this row and not delivered yet

    @property
    def stalled(self) -> bool:
        """Late at a frame and silent since: not waited for until its audio comes again."""
        return self.silent_frames > 0


class RowHandle:
    """A conversation's end of its row: push frames in, end the input, close."""

    def __init__(self, scheduler: "FrameScheduler", index: int, row: _Row):
        self._scheduler, self.index, self._row = scheduler, index, row

    def push(self, pcm: np.ndarray, agent_listens: bool = False) -> None:
        """Queue one microphone frame [frame_samples] float32 (24 kHz)."""
        self._scheduler._push(self.index, self._row, pcm, agent_listens)

    def end_input(self) -> None:
        """No more frames: the row ends once every queued frame is answered."""
        self._scheduler._end_input(self._row)

    def close(self) -> None:
        """The reader stopped: free the row at the next frame, whatever is still queued."""
        self._scheduler._close(self.index, self._row)


class FrameScheduler:
    def __init__(self, runner: FrameRunner, tokenizer: TextTokenizer, compute_lock: threading.Lock, *,
                 max_wait_s: float = 0.16, overlap_frames: bool | None = None):
        """`overlap_frames`: launch a frame that is due before handing out the one in flight.
        Default: when the runner replays CUDA graphs, whose launch costs the host microseconds
        while the device runs the frame for milliseconds. Without a graph the launch is the
        frame's host time (every kernel queued from Python, 60-120 ms on an H200), so the one in
        flight would be handed out a whole launch late (run T's graphs-off realtime call: a
        reply 199 ms after its microphone frame at p50, 63 ms in run S before the overlap); off
        the GPU a frame's results are there when its launch returns."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.compute_lock = compute_lock
        self.max_wait_s = max_wait_s
        self.overlap_frames = _overlaps_by_default(runner) if overlap_frames is None else overlap_frames
        self._rows: list[_Row | None] = [None] * runner.batch_size
        self._leaving: set[int] = set()  # rows to reset in the runner before the next frame
        # Joined rows whose input queue is empty: a frame waits for them (or for the clock).
        # Kept up to date so that a pushed frame wakes the worker only when it completes a frame.
        self._starved: set[int] = set()
        lock = threading.Lock()
        self._changed = threading.Condition(lock)  # wakes the worker
        self._freed = threading.Condition(lock)  # wakes conversations waiting for a row
        self.late_frames = 0
        self.frames_run = 0
        self._recent_frame_ms: deque[float] = deque(maxlen=RECENT_FRAMES)
        # Two sets of host buffers, used in turn: a frame's are written while the previous
        # frame's may still be on their way to or from the device.
        self._host = [_HostBuffers(runner) for _ in range(2)]
        self._last_done = 0.0  # perf_counter when the previous frame's results were on the host
        self._worker = threading.Thread(target=self._run, name="personaplex-frames", daemon=True)
        self._worker.start()

    @property
    def capacity(self) -> int:
        return len(self._rows)

    @property
    def live_rows(self) -> int:
        with self._changed:
            return sum(row is not None for row in self._rows)

    def stats(self) -> dict[str, float | int]:
        """Frames run, paced frames that arrived late, rows in use, and the compute time of
        the recent frames (median and p99, ms; host copies included; for frames queued back
        to back, from one frame's results to the next's)."""
        with self._changed:
            recent = sorted(self._recent_frame_ms)
            live = sum(row is not None for row in self._rows)
        stats: dict[str, float | int] = {"frames_run": self.frames_run, "late_frames": self.late_frames,
                                         "live_rows": live, "capacity": self.capacity}
        if recent:
            stats["frame_ms_median"] = round(recent[len(recent) // 2], 3)
            stats["frame_ms_p99"] = round(recent[min(len(recent) - 1, int(0.99 * len(recent)))], 3)
        return stats

    # ---- conversations (any thread)

    def open(self, persona: PersonaSnapshot, sampling: SamplingConfig, seed: int | None, deliver: Delivery, *,
             paced: bool, wait_s: float | None = None) -> RowHandle:
        """Claim a free row for a conversation starting after `persona`. Agent frames go to
        `deliver`, one per frame pushed, then None. Waits up to `wait_s` seconds for a free row
        (None: as long as it takes), then raises NoFreeRowError."""
        row = _Row(deliver=deliver, paced=paced, persona=persona, sampling=sampling, seed=seed)
        with self._changed:
            free = self._freed.wait_for(lambda: None in self._rows, timeout=wait_s)
            if not free:
                raise NoFreeRowError(f"all {self.capacity} conversation slots are taken: try again later")
            index = self._rows.index(None)
            self._rows[index] = row
            return RowHandle(self, index, row)

    def _push(self, index: int, row: _Row, pcm: np.ndarray, agent_listens: bool) -> None:
        with self._changed:
            row.inputs.append((pcm, agent_listens))
            self.late_frames += row.silent_frames  # its audio was late for them, not missing
            row.silent_frames = 0
            if len(row.inputs) == 1:
                row.oldest_wait = time.monotonic()
                self._starved.discard(index)
                if not self._starved:  # this frame may be the last one a frame waited for
                    self._changed.notify()

    def _end_input(self, row: _Row) -> None:
        with self._changed:
            row.input_ended = True
            self._changed.notify_all()

    def _close(self, index: int, row: _Row) -> None:
        with self._changed:
            if self._rows[index] is row:
                row.closed = True
                self._changed.notify_all()

    # ---- the worker thread

    def _run(self) -> None:
        in_flight: _Launched | None = None  # launched, its results not handed out yet
        while True:
            with self._changed:
                while in_flight is None and not self._work_due():
                    self._changed.wait(timeout=self._until_overdue())
                ended = self._retire_rows()
                joins, leaves, frames = self._take_work()
            for row in ended:
                _deliver(row, None)
            launched = None
            if joins or leaves or frames:
                with self.compute_lock:
                    self._apply(joins, leaves)
                    if frames:
                        launched = self._launch(frames)
            if in_flight is not None:
                self._finish(in_flight)
            in_flight = launched
            if in_flight is not None and not self.overlap_frames:
                self._finish(in_flight)
                in_flight = None

    def _take_work(self) -> tuple[list[tuple[int, _Row]], list[int], dict[int, tuple[_Row, _Input | None]]]:
        """What to do before the next frame (rows joining, rows leaving) and, when a frame is
        due, each taking part row's input for it (None: it hears silence)."""
        if not self._frame_due():
            return [], self._take_leaves(), {}
        joins = [(i, r) for i, r in self._live() if not r.joined and r.inputs]
        for _, row in joins:
            row.joined = True
        leaves = self._take_leaves()
        frames = {i: (r, self._next_input(r)) for i, r in self._live() if r.joined}
        for _, (row, frame) in frames.items():
            row.silent_frames += frame is None
            row.in_flight += 1
        self._starved.update(i for i, r in self._live() if r.joined and not r.inputs and not r.stalled)
        return joins, leaves, frames

    def _until_overdue(self) -> float:
        """Seconds until the oldest waiting paced frame is overdue (at most one frame period)."""
        waiting = [row.oldest_wait for _, row in self._live() if row.paced and row.inputs]
        if not waiting:
            return self.max_wait_s
        return max(0.0, min(waiting) + self.max_wait_s - time.monotonic())

    def _live(self) -> list[tuple[int, _Row]]:
        return [(i, row) for i, row in enumerate(self._rows) if row is not None]

    def _work_due(self) -> bool:
        return self._frame_due() or bool(self._leaving) or any(row.closed or _answered(row) for _, row in self._live())

    def _retire_rows(self) -> list[_Row]:
        """Free closed rows and rows whose input ended and was all answered; returns the rows
        whose readers must still be told the conversation ended."""
        ended = []
        for index, row in self._live():
            if row.closed or _answered(row):
                self._rows[index] = None
                self._starved.discard(index)
                if row.joined:
                    self._leaving.add(index)
                if not row.closed:
                    ended.append(row)
                self._freed.notify()  # a row is free: a waiting `open` may take it
        return ended

    def _take_leaves(self) -> list[int]:
        leaves = sorted(self._leaving)
        self._leaving.clear()
        return leaves

    def _frame_due(self) -> bool:
        """A frame runs when every row that takes part has input waiting (a row takes part
        once it has had input), or when the oldest waiting paced frame is overdue."""
        waiting = [row for _, row in self._live() if row.inputs]
        if not waiting:
            return False
        if all(row.inputs or not row.joined or row.stalled for _, row in self._live()):
            return True
        paced = [row.oldest_wait for row in waiting if row.paced]
        return bool(paced) and time.monotonic() - min(paced) >= self.max_wait_s

    def _next_input(self, row: _Row) -> _Input | None:
        """The row's next frame, or None when it has none yet (a late paced client)."""
        if not row.inputs:
            return None
        frame = row.inputs.popleft()
        row.oldest_wait = time.monotonic() if row.inputs else None
        return frame

    def _apply(self, joins: list[tuple[int, _Row]], leaves: list[int]) -> None:
        joining = {index for index, _ in joins}
        for index in leaves:
            if index not in joining:  # a join resets the row anyway
                self.runner.leave(index)
        for index, row in joins:
            self.runner.join(index, row.persona, row.sampling, row.seed)

    def _launch(self, frames: dict[int, tuple[_Row, _Input | None]]) -> _Launched | None:
        """Start a frame on the device; its results come back into one set of host buffers."""
        host = self._host[self.frames_run % 2]
        host.take_inputs({index: frame for index, (_, frame) in frames.items()})
        rows = {index: row for index, (row, _) in frames.items()}
        started = time.perf_counter()
        try:
            done = host.run(self.runner)
        except Exception as err:  # a failed frame ends every conversation in it, never the worker
            self._fail(rows, err)
            return None
        self.frames_run += 1
        return _Launched(rows, host, done, started)

    def _finish(self, frame: _Launched) -> None:
        """Wait for a launched frame's results and hand each row its chunk."""
        try:
            if frame.done is not None:
                frame.done.synchronize()
        except Exception as err:
            self._fail(frame.rows, err)
            return
        now = time.perf_counter()
        # The frame's own time: from its launch, or from the previous frame's results when it
        # was queued behind them on the device.
        elapsed_ms = (now - max(frame.started, self._last_done)) * 1e3
        self._last_done = now
        self._recent_frame_ms.append(elapsed_ms)
        agent_pcm, tokens = frame.host.agent_pcm.numpy(), frame.host.tokens.tolist()
        for index, row in frame.rows.items():
            if not row.closed and self._rows[index] is row:  # not closed, nor ended by a failed frame since
                _deliver(row, chunk_of(self.tokenizer, agent_pcm[index].copy(), tokens[index], row.frames_done, elapsed_ms))
                row.frames_done += 1
        with self._changed:
            for row in frame.rows.values():
                row.in_flight -= 1
            self._changed.notify()  # a row whose input ended may now be all answered

    def _fail(self, rows: dict[int, _Row], err: Exception) -> None:
        """End every conversation of a failed frame (their rows are freed) with its error."""
        with self._changed:
            failed = [(index, row) for index, row in rows.items() if self._rows[index] is row]
            for index, row in failed:
                self._rows[index] = None
                self._starved.discard(index)
                self._leaving.add(index)
            self._freed.notify_all()
        for _, row in failed:
            _deliver(row, err)


def _overlaps_by_default(runner: FrameRunner) -> bool:
    """Overlap frames where a launch is a graph replay on CUDA (see `FrameScheduler`)."""
    return runner.device.type == "cuda" and runner.use_graphs


_Input = tuple[np.ndarray, bool]  # a microphone frame [frame_samples] float32, and whether the agent listens


def _answered(row: _Row) -> bool:
    """Its input ended and every frame of it has been handed back."""
    return row.input_ended and not row.inputs and not row.in_flight


class _HostBuffers:
    """One frame's inputs and outputs on the host, pinned on CUDA so that the copies to and
    from the device neither wait for the host nor make it wait."""

    def __init__(self, runner: FrameRunner):
        self.device = runner.device
        pin = self.device.type == "cuda"
        batch, samples = runner.batch_size, runner.mimi.frame_samples
        self.user_pcm = torch.zeros(batch, samples, pin_memory=pin)
        self.agent_listens = torch.zeros(batch, dtype=torch.bool, pin_memory=pin)
        self.agent_pcm = torch.zeros(batch, samples, pin_memory=pin)
        self.tokens = torch.zeros(runner.tokens.shape, dtype=runner.tokens.dtype, pin_memory=pin)

    def take_inputs(self, frames: dict[int, _Input | None]) -> None:
        """Rows without a frame (late, stopped, or not taking part) hear silence."""
        self.user_pcm.zero_()
        self.agent_listens.zero_()
        for index, frame in frames.items():
            if frame is not None:
                self.user_pcm[index] = torch.from_numpy(frame[0])
                self.agent_listens[index] = frame[1]

    def run(self, runner: FrameRunner) -> torch.cuda.Event | None:
        """Queue the frame and its results' copy back; on CUDA returns the event that marks
        them on the host, elsewhere they are there when this returns."""
        return runner.launch(self.user_pcm, self.agent_listens, results=(self.agent_pcm, self.tokens))


@dataclass
class _Launched:
    """A frame on its way through the device."""

    rows: dict[int, _Row]  # the rows it was launched for (a row index may be reused by then)
    host: _HostBuffers  # where its results land
    done: torch.cuda.Event | None  # recorded after the copy of its results (CUDA only)
    started: float  # perf_counter at its launch


def _deliver(row: _Row, item: AudioChunk | BaseException | None) -> None:
    """Hand a frame to its conversation; a reader that has gone away (its event loop closed)
    must not take the worker down with it."""
    try:
        row.deliver(item)
    except RuntimeError:
        pass
