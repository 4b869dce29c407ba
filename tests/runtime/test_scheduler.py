"""Conversations as rows of one batched frame (`FrameScheduler`), on the tiny model: an engine
with three rows against one with a single row. The three-row engine runs every test twice:
frame by frame, and with each due frame launched before the one in flight is handed out
(what the scheduler does when its frame is a CUDA graph)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from personaplex import PersonaPlex
from personaplex.runtime.sampling import SamplingConfig
from personaplex.runtime.scheduler import _overlaps_by_default

FRAME = 1920


@pytest.fixture(scope="module", params=[False, True], ids=["frame-by-frame", "overlapped"])
def batched_engine(tiny_folder, request):
    engine = PersonaPlex.from_pretrained(tiny_folder, device="cpu", max_sessions=3)
    engine.scheduler.max_wait_s = 0.5  # generous: this CPU is shared with other work
    engine.scheduler.overlap_frames = request.param
    return engine


def audio(seed: int, frames: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(frames * FRAME)).astype(np.float32)


async def blocks(pcm: np.ndarray, size: int):
    for start in range(0, pcm.size, size):
        yield pcm[start : start + size]
        await asyncio.sleep(0)


async def collect(engine, pcm: np.ndarray, size: int = 1000, **kwargs) -> list:
    return [chunk async for chunk in engine.respond_realtime(blocks(pcm, size), greedy=True, **kwargs)]


def test_a_batched_conversation_equals_the_unbatched_one(engine, batched_engine):
    pcm = audio(1, 5)
    unbatched = asyncio.run(collect(engine, pcm))
    batched = asyncio.run(collect(batched_engine, pcm))
    assert len(batched) == len(unbatched) == 5
    assert [c.agent_codes for c in batched] == [c.agent_codes for c in unbatched]
    assert [c.text for c in batched] == [c.text for c in unbatched]
    np.testing.assert_allclose(np.stack([c.pcm for c in batched]), np.stack([c.pcm for c in unbatched]), atol=1e-5)


def test_simultaneous_conversations_share_frames_and_stay_independent(engine, batched_engine):
    pcms = [audio(2, 4), audio(3, 6), audio(4, 3)]
    alone = [asyncio.run(collect(engine, pcm, voice=voice)) for pcm, voice in zip(pcms, ("NATF0", "VARM2", "NATM1"))]

    async def together():
        return await asyncio.gather(*(collect(batched_engine, pcm, size=size, voice=voice)
                                      for pcm, size, voice in zip(pcms, (1920, 777, 4000), ("NATF0", "VARM2", "NATM1"))))

    ticks_before = batched_engine.scheduler.frames_run
    results = asyncio.run(together())
    for got, expected in zip(results, alone):
        assert [c.agent_codes for c in got] == [c.agent_codes for c in expected]
    assert batched_engine.scheduler.frames_run - ticks_before < sum(len(r) for r in results)  # frames were shared
    assert batched_engine.scheduler.live_rows == 0  # every row was freed


def test_a_conversation_beyond_the_rows_waits_for_a_free_one(batched_engine):
    async def endless(stop: asyncio.Event):
        while not stop.is_set():
            yield np.zeros(FRAME, np.float32)
            await asyncio.sleep(0.01)

    async def run():
        stop = asyncio.Event()
        streams = [batched_engine.respond_realtime(endless(stop)) for _ in range(3)]
        for stream in streams:
            await stream.__anext__()
        fourth = asyncio.ensure_future(collect(batched_engine, audio(8, 2)))
        await asyncio.sleep(0.5)
        waited = not fourth.done()
        await streams[0].aclose()  # a row frees: the fourth conversation takes it
        chunks = await asyncio.wait_for(fourth, timeout=30)
        stop.set()
        for stream in streams[1:]:
            await stream.aclose()
        return waited, chunks

    waited, chunks = asyncio.run(run())
    assert waited and len(chunks) == 2


def test_recordings_run_beside_live_conversations_unchanged(engine, batched_engine):
    """respond_duplex and respond (unpaced rows) next to a live conversation give what they give alone."""
    recording = audio(9, 4)
    alone_duplex = engine.respond_duplex(recording, greedy=True)
    alone_turn = engine.respond(recording, greedy=True, max_steps=3)

    async def run():
        live = asyncio.ensure_future(collect(batched_engine, audio(10, 6), size=FRAME))
        duplex = await asyncio.to_thread(batched_engine.respond_duplex, recording, greedy=True)
        turn = await asyncio.to_thread(batched_engine.respond, recording, greedy=True, max_steps=3)
        return duplex, turn, await live

    duplex, turn, live = asyncio.run(run())
    assert duplex.text_tokens == alone_duplex.text_tokens
    assert [f.agent_codes for f in duplex.frames] == [f.agent_codes for f in alone_duplex.frames]
    assert [f.agent_codes for f in turn.frames] == [f.agent_codes for f in alone_turn.frames]
    np.testing.assert_allclose(turn.audio, alone_turn.audio, atol=1e-5)
    assert len(live) == 6


def beside_a_steady_client(engine, pauser, steady_frames: int) -> tuple[list, list, int]:
    """A steady live client of `steady_frames` frames and the `pauser` live stream at once:
    (the steady client's frames, the pauser's frames, frames counted late meanwhile)."""
    async def run():
        late_before = engine.scheduler.late_frames
        steady, paused = await asyncio.gather(collect(engine, audio(5, steady_frames), size=FRAME),
                                              _collect_stream(engine.respond_realtime(pauser, greedy=True)))
        return steady, paused, engine.scheduler.late_frames - late_before

    return asyncio.run(run())


def test_a_late_client_hears_silence_instead_of_stalling_the_others(batched_engine):
    async def slow():
        yield np.zeros(FRAME, np.float32)
        await asyncio.sleep(1.2)  # more than max_wait_s (0.5 s): the others go on
        yield np.zeros(FRAME, np.float32)

    fast, slow_chunks, late = beside_a_steady_client(batched_engine, slow(), 8)
    assert len(fast) == 8
    assert late >= 1 and len(slow_chunks) >= 2


def test_a_client_that_stops_sending_hears_silence_but_is_not_late(batched_engine):
    async def stops():
        yield np.zeros(FRAME, np.float32)
        await asyncio.sleep(1.2)  # connected but silent: the others go on without it
        # ... and hangs up without sending more

    fast, stopped, late = beside_a_steady_client(batched_engine, stops(), 30)
    assert len(fast) == 30
    assert len(stopped) >= 2  # it heard silence while the other conversation went on
    assert late == 0  # none of its audio came late: there was none


async def _collect_stream(stream) -> list:
    return [chunk async for chunk in stream]


def test_a_seed_gives_the_same_sampled_conversation_batched_or_alone(engine, batched_engine):
    pcms = [audio(6, 5), audio(7, 5)]
    alone = asyncio.run(collect_sampled(engine, pcms[0], seed=123))

    async def together():
        return await asyncio.gather(collect_sampled(batched_engine, pcms[0], seed=123),
                                    collect_sampled(batched_engine, pcms[1], seed=9))

    batched, other = asyncio.run(together())
    assert [c.agent_codes for c in batched] == [c.agent_codes for c in alone]
    assert [c.agent_codes for c in other] != [c.agent_codes for c in alone]


async def collect_sampled(engine, pcm: np.ndarray, seed: int) -> list:
    return [chunk async for chunk in engine.respond_realtime(blocks(pcm, 1920), seed=seed)]


def test_a_recording_is_handed_out_behind_the_next_frames_launch_when_overlapped(batched_engine):
    """Unpaced frames are all due at once: overlapped, frame k is handed out once frame k + 1 is
    launched, and the end of the conversation comes after its last frame."""
    scheduler = batched_engine.scheduler
    launched_at_hand_out: list = []
    finished = threading.Event()

    def deliver(item):  # called on the worker thread, as it hands each frame out
        launched_at_hand_out.append(None if item is None else scheduler.frames_run - before)
        if item is None:
            finished.set()

    before = scheduler.frames_run
    row = scheduler.open(batched_engine.persona(), SamplingConfig(greedy=True), 0, deliver, paced=False)
    with batched_engine.compute_lock:  # no frame launches before every one is queued
        for pcm in audio(11, 5).reshape(5, FRAME):
            row.push(pcm)
        row.end_input()
    assert finished.wait(timeout=60)
    expected = [2, 3, 4, 5, 5] if scheduler.overlap_frames else [1, 2, 3, 4, 5]
    assert launched_at_hand_out == expected + [None]


@pytest.mark.parametrize(("device", "use_graphs", "overlapped"),
                         [("cuda", True, True), ("cuda", False, False), ("cpu", False, False)])
def test_frames_overlap_by_default_only_where_a_launch_is_a_graph_replay(device, use_graphs, overlapped):
    """Without a graph the launch is the frame's host time: launching the next frame first would
    hand every frame out a whole launch late."""
    runner = SimpleNamespace(device=torch.device(device), use_graphs=use_graphs)
    assert _overlaps_by_default(runner) is overlapped
