"""Full-duplex conversations batched in lockstep (`enable_batching`), on the tiny model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from personaplex import PersonaPlex

FRAME = 1920


@pytest.fixture(scope="module")
def batched_engine(tiny_folder):
    engine = PersonaPlex.from_pretrained(tiny_folder, device="cpu")
    engine.enable_batching(max_sessions=3, max_wait_s=0.5)
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

    ticks_before = batched_engine.batcher.ticks
    results = asyncio.run(together())
    for got, expected in zip(results, alone):
        assert [c.agent_codes for c in got] == [c.agent_codes for c in expected]
    assert batched_engine.batcher.ticks - ticks_before < sum(len(r) for r in results)  # frames were shared
    assert batched_engine.batcher.live_rows == 0  # every row was freed


def test_more_conversations_than_rows_are_refused(batched_engine):
    from personaplex.runtime.batching import NoFreeRowError

    async def endless():
        while True:
            yield np.zeros(FRAME, np.float32)
            await asyncio.sleep(0.01)

    async def run():
        streams = [batched_engine.respond_realtime(endless()) for _ in range(4)]
        firsts = []
        for stream in streams[:3]:
            firsts.append(await stream.__anext__())
        with pytest.raises(NoFreeRowError, match="all 3 conversation slots"):
            await streams[3].__anext__()
        for stream in streams:
            await stream.aclose()
        return firsts

    assert len(asyncio.run(run())) == 3
    assert batched_engine.batcher.live_rows == 0


def test_a_late_client_hears_silence_instead_of_stalling_the_others(batched_engine):
    async def slow():
        yield np.zeros(FRAME, np.float32)
        await asyncio.sleep(1.2)  # more than max_wait_s (0.5 s): the others go on
        yield np.zeros(FRAME, np.float32)

    async def run():
        late_before = batched_engine.batcher.late_frames
        fast, slow_chunks = await asyncio.gather(collect(batched_engine, audio(5, 8), size=FRAME),
                                                 _collect_stream(batched_engine.respond_realtime(slow(), greedy=True)))
        return fast, slow_chunks, batched_engine.batcher.late_frames - late_before

    fast, slow_chunks, late = asyncio.run(run())
    assert len(fast) == 8
    assert late >= 1 and len(slow_chunks) >= 2


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
