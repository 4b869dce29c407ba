"""The one frame (`FrameRunner`, eager here on CPU) against the readable frame spelled out
from the model's parts: Mimi encode, one generator step, Mimi decode, one conversation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from personaplex.runtime.generation import FrameGenerator, StepInputs
from personaplex.runtime.persona import SILENCE_CODES, TEXT_PAD
from personaplex.runtime.runner import FrameRunner
from personaplex.runtime.sampling import SamplingConfig

FRAMES = 6
GREEDY = SamplingConfig(greedy=True)


def user_audio(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((FRAMES, 1920))).astype(np.float32)


def readable_frames(engine, audio: np.ndarray, listening: list[bool]) -> tuple[list[list[int]], list[np.ndarray]]:
    """The frame as the model's parts define it, for one conversation after the default persona."""
    lm, mimi = engine.lm, engine.mimi
    generator = FrameGenerator(lm, 1, GREEDY, agent_only=True)
    engine.persona().restore(generator)
    codec = mimi.init_stream(1)
    tokens, pcm = [], []
    with torch.no_grad():
        for frame, listens in zip(audio, listening):
            user = mimi.encode_step(torch.from_numpy(frame).view(1, 1, -1), codec)[:, :, 0]
            inputs = StepInputs(user=user)
            if listens:
                inputs.text = torch.tensor([[TEXT_PAD]])
                inputs.agent = torch.tensor([SILENCE_CODES])
            out = generator.step(inputs)
            tokens.append(out[0].tolist())
            pcm.append(mimi.decode_step(out[:, 1:, None], codec)[0, 0].numpy())
    return tokens, pcm


def run_rows(engine, batch_size: int, rows: dict[int, tuple[np.ndarray, list[bool]]],
             compile_frame: bool = False) -> dict[int, tuple[list, list]]:
    runner = FrameRunner(engine.lm, engine.mimi, batch_size, use_graphs=False, compile_frame=compile_frame)
    for row in rows:
        runner.join(row, engine.persona(), GREEDY)
    got = {row: ([], []) for row in rows}
    for frame in range(FRAMES):
        pcm = torch.zeros(batch_size, 1920)
        listens = torch.zeros(batch_size, dtype=torch.bool)
        for row, (audio, listening) in rows.items():
            pcm[row] = torch.from_numpy(audio[frame])
            listens[row] = listening[frame]
        runner.run(pcm, listens)
        assert bool(runner.valid.all()) or set(rows) != set(range(batch_size))
        for row in rows:
            got[row][0].append(runner.tokens[row].tolist())
            got[row][1].append(runner.agent_pcm[row, 0].numpy().copy())
    return got


def test_rows_equal_the_readable_frame_of_each_conversation(engine):
    """Two rows with different user audio, one listening for its first frames: each row's
    greedy tokens and audio equal the readable frame's; a row nobody joined changes nothing."""
    listening = [[False] * FRAMES, [True, True, True, False, False, False]]
    audios = [user_audio(1), user_audio(2)]
    expected = [readable_frames(engine, audio, listen) for audio, listen in zip(audios, listening)]
    got = run_rows(engine, 3, {0: (audios[0], listening[0]), 2: (audios[1], listening[1])})
    for (tokens, pcm), row in zip(expected, (0, 2)):
        assert got[row][0] == tokens
        np.testing.assert_allclose(np.stack(got[row][1]), np.stack(pcm), atol=1e-5)


@pytest.mark.slow
def test_the_compiled_frame_equals_the_frame_as_written(engine):
    """The fast path is `_frame` with its three parts compiled (then, on CUDA, each captured in
    a graph). Compiled here for the CPU, each part must trace as one graph (fullgraph: no break,
    no Python left between kernels) and give each row the same greedy tokens and audio as the
    frame as written."""
    listening = [[False] * FRAMES, [True, True, True, False, False, False]]
    rows = {0: (user_audio(1), listening[0]), 2: (user_audio(2), listening[1])}
    expected = run_rows(engine, 3, rows)
    got = run_rows(engine, 3, rows, compile_frame=True)
    for row in rows:
        assert got[row][0] == expected[row][0]
        np.testing.assert_allclose(np.stack(got[row][1]), np.stack(expected[row][1]), atol=1e-5)


def test_a_frame_that_fails_to_compile_runs_as_written(engine, caplog):
    """No working compiler (say, Triton missing): one warning, then the frame as written, with
    the same results."""
    audio = torch.from_numpy(user_audio(5))
    listens = torch.zeros(1, dtype=torch.bool)
    outputs = []
    for compile_frame in (False, True):
        runner = FrameRunner(engine.lm, engine.mimi, 1, use_graphs=False, compile_frame=compile_frame)
        if compile_frame:
            def no_compiler() -> None:
                raise torch._dynamo.exc.TorchDynamoException("no working compiler")
            runner._compiled_parts = (no_compiler,) * 3
        runner.join(0, engine.persona(), GREEDY)
        with caplog.at_level("WARNING"):
            outputs.append([runner.run(audio[f][None], listens) or runner.tokens.clone() for f in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    assert runner._compiled_parts is None
    assert "compiling the frame failed (no working compiler)" in caplog.text


def test_a_listening_agent_is_held_at_silence(engine):
    got = run_rows(engine, 2, {0: (user_audio(4), [True] * FRAMES), 1: (user_audio(4), [False] * FRAMES)})
    # The text stream has no delay: a listening row's text is PAD from its first frame.
    assert all(tokens[0] == TEXT_PAD for tokens in got[0][0])
    # Audio codebooks come out one frame late (delay 1): SILENCE from the second frame on.
    assert all(tokens[1:] == list(SILENCE_CODES) for tokens in got[0][0][1:])
    assert got[1][0] != got[0][0]


def test_rejoin_restarts_the_row(engine):
    """leave + join gives the row the same conversation as a fresh start."""
    audio = torch.from_numpy(user_audio(3))
    runner = FrameRunner(engine.lm, engine.mimi, 1, use_graphs=False)
    listens = torch.zeros(1, dtype=torch.bool)

    def three_frames() -> list[torch.Tensor]:
        runner.join(0, engine.persona(), GREEDY)
        out = []
        for frame in range(3):
            runner.run(audio[frame][None], listens)
            out.append(runner.tokens.clone())
        return out

    first = three_frames()
    runner.leave(0)
    assert all(torch.equal(a, b) for a, b in zip(first, three_frames()))


def test_a_frame_that_is_not_valid_is_silent(engine):
    """A row that never joined a persona holds start tokens while the delays fill: its
    frame is marked not valid and its audio is silence (codes clamped for the decoder)."""
    runner = FrameRunner(engine.lm, engine.mimi, 2, use_graphs=False)
    runner.join(1, engine.persona(), GREEDY)
    runner.run(torch.full((2, 1920), 0.1), torch.zeros(2, dtype=torch.bool))
    assert runner.valid.tolist() == [False, True]
    assert float(runner.agent_pcm[0].abs().max()) == 0.0
    assert float(runner.agent_pcm[1].abs().max()) > 0.0


def test_a_free_row_keeps_no_history(engine):
    """Rows nobody joined compute every frame but keep nothing, so they never grow into
    full-context attention; a joined row's history grows one frame per frame."""
    runner = FrameRunner(engine.lm, engine.mimi, 2, use_graphs=False)
    runner.join(1, engine.persona(), GREEDY)
    start = int(runner.generator.temporal.next_position[1])
    for _ in range(5):
        runner.run(torch.zeros(2, 1920), torch.zeros(2, dtype=torch.bool))
    assert runner.generator.temporal.next_position.tolist() == [1, start + 5]
    runner.leave(1)
    runner.run(torch.zeros(2, 1920), torch.zeros(2, dtype=torch.bool))
    assert runner.generator.temporal.next_position.tolist() == [1, 1]


def test_defaults_follow_the_device(engine):
    runner = FrameRunner(engine.lm, engine.mimi, 1)
    assert runner.use_graphs is False  # CPU: the readable eager frame
    assert runner.compile_frame is False
    assert runner.kernels.ring_attention is False


def test_compile_tuning_is_checked_when_the_runner_is_built(engine):
    with pytest.raises(ValueError, match="unknown compile tuning 'fastest'"):
        FrameRunner(engine.lm, engine.mimi, 1, compile_tuning="fastest")


def test_int4_layers_rearranged_for_the_tensor_cores_give_the_same_frames(tiny_folder, tmp_path, monkeypatch):
    """A runner with `Kernels.int4_tensor_cores_from_rows` (and `int4_depformer_tensor_cores_from_rows`)
    at or under its rows hands the temporal (and the depformer's) int4 layers to the tensor-core
    kernel's layout. The kernel is CUDA C: here on the CPU it is declared available,
    so the runner rearranges the layers, which then compute on their dequantized weights. Those
    are the same weights, so the frames are the same, token for token and sample for sample."""
    from personaplex import PersonaPlex
    from personaplex.model.config import LMConfig
    from personaplex.model.kernels import int4_mma
    from personaplex.model.layers import Kernels
    from personaplex.model.quantize import Int4Linear, Int4TensorCoreLinear
    from tests.fixtures.mlx_folder import make_mlx_model_folder
    from tests.fixtures.tiny_lm import random_lm

    # An MLX 4-bit folder: every linear input a multiple of the 64-wide groups, as the real model's are.
    lm_config = LMConfig(dim=128, num_heads=4, num_layers=2, hidden_scale=3.0, card=2048, text_card=256,
                         context=384, depformer_dim=128, depformer_num_heads=4, depformer_num_layers=2,
                         depformer_dim_feedforward=384)
    folder = make_mlx_model_folder(tmp_path / "mlx", random_lm(lm_config, seed=1), 4, tiny_folder)
    engine = PersonaPlex.from_pretrained(folder, device="cpu", dtype=torch.float32, max_sessions=2)
    in_proj = lambda: engine.lm.transformer.layers[0].self_attn.in_proj  # noqa: E731
    depformer_linear_in = lambda: engine.lm.depformer.layers[1].gating[3].linear_in  # noqa: E731
    audio = user_audio(3)

    def frames(kernels: Kernels) -> tuple[list, list]:
        runner = FrameRunner(engine.lm, engine.mimi, 2, use_graphs=False, kernels=kernels)
        runner.join(0, engine.persona(), GREEDY)
        tokens, pcm = [], []
        for frame in range(FRAMES):
            runner.run(torch.from_numpy(audio[frame]).expand(2, -1).contiguous(), torch.zeros(2, dtype=torch.bool))
            tokens.append(runner.tokens[0].tolist())
            pcm.append(runner.agent_pcm[0, 0].numpy().copy())
        return tokens, pcm

    expected_tokens, expected_pcm = frames(Kernels(int4_tensor_cores_from_rows=3))  # two rows: below it
    assert type(in_proj()) is Int4Linear and type(depformer_linear_in()) is Int4Linear
    monkeypatch.setattr(int4_mma, "available", lambda device: True)
    for kernels, depformer_type in ((Kernels(int4_tensor_cores_from_rows=2, int4_depformer_tensor_cores_from_rows=3), Int4Linear),
                                    (Kernels(int4_tensor_cores_from_rows=2, int4_depformer_tensor_cores_from_rows=2), Int4TensorCoreLinear)):
        tokens, pcm = frames(kernels)
        assert type(in_proj()) is Int4TensorCoreLinear and type(depformer_linear_in()) is depformer_type
        assert tokens == expected_tokens
        np.testing.assert_array_equal(np.stack(pcm), np.stack(expected_pcm))
