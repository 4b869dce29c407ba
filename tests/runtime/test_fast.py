"""The batched fast frame (its eager path here, on CPU) against the readable Conversation path."""

from __future__ import annotations

import numpy as np
import torch

from personaplex.runtime.fast import FastFrameRunner
from personaplex.runtime.sampling import SamplingConfig

FRAMES = 6


def user_audio(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((FRAMES, 1920))).astype(np.float32)


def conversation_tokens(engine, audio: np.ndarray) -> tuple[list[list[int]], list[np.ndarray]]:
    conversation = engine.conversation(greedy=True, seed=0)
    results = [conversation.step(frame) for frame in audio]
    return [[r.text_token, *r.agent_codes] for r in results], [r.pcm for r in results]


def test_runner_rows_equal_conversations(engine):
    """Two rows with different user audio: each row's greedy tokens and audio equal a
    Conversation's on the same persona and audio; a row that is not joined changes nothing."""
    audios = [user_audio(1), user_audio(2)]
    expected = [conversation_tokens(engine, audio) for audio in audios]
    runner = FastFrameRunner(engine, batch_size=3, sampling=SamplingConfig(greedy=True), use_graphs=False)
    persona = engine.persona()
    runner.join(0, persona)
    runner.join(2, persona)
    got_tokens: list[list[list[int]]] = [[], []]
    got_pcm: list[list[np.ndarray]] = [[], []]
    for frame in range(FRAMES):
        pcm = torch.zeros(3, 1920)
        pcm[0] = torch.from_numpy(audios[0][frame])
        pcm[2] = torch.from_numpy(audios[1][frame])
        agent_pcm, tokens = runner.run(pcm)
        for index, row in enumerate((0, 2)):
            got_tokens[index].append(tokens[row].tolist())
            got_pcm[index].append(agent_pcm[row].numpy().copy())
    for index in range(2):
        assert got_tokens[index] == expected[index][0]
        np.testing.assert_allclose(np.stack(got_pcm[index]), np.stack(expected[index][1]), atol=1e-5)


def test_rejoin_restarts_the_row(engine):
    """leave + join gives the row the same conversation as a fresh runner."""
    audio = torch.from_numpy(user_audio(3))
    persona = engine.persona()
    runner = FastFrameRunner(engine, batch_size=1, sampling=SamplingConfig(greedy=True), use_graphs=False)
    runner.join(0, persona)
    first = [runner.run(audio[f][None])[1].clone() for f in range(3)]
    runner.leave(0)
    runner.join(0, persona)
    second = [runner.run(audio[f][None])[1].clone() for f in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
