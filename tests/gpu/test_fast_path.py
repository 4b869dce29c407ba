"""The fast frame (the frame compiled by torch.compile, captured in a CUDA graph, with the Triton
ring attention) against the readable eager frame, on the GPU, in float32 where the two must
agree to rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from personaplex import PersonaPlex
from personaplex.model.layers import READABLE_KERNELS, Kernels
from personaplex.runtime.runner import FrameRunner
from personaplex.runtime.sampling import SamplingConfig

FRAMES = 60
GREEDY = SamplingConfig(greedy=True)


@pytest.fixture(autouse=True, scope="module")
def exact_float32():
    """These comparisons are exact in float32, so TF32 is off for them. cuDNN runs float32
    convolutions in TF32 by default, and the compiled frame may pick other convolution
    kernels (other memory layouts) than the frame as written: Mimi's outputs would then
    differ at ~1e-3 and the encoder's nearest-codeword choices could flip. (Users keep
    PyTorch's defaults: the reference runs Mimi with them too.) Module-scoped, so that it is
    on before the shared engine below compiles and captures its frame."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def gpu_engine(tiny_folder):
    return PersonaPlex.from_pretrained(tiny_folder, device="cuda", dtype=torch.float32, max_sessions=3)


def audio(frames: int, rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(frames, rows, 1920, generator=gen)


def run(runner: FrameRunner, pcm: torch.Tensor, listens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    listens = torch.zeros(runner.batch_size, dtype=torch.bool) if listens is None else listens
    runner.run(pcm.cuda(), listens.cuda())
    return runner.tokens.clone(), runner.agent_pcm[:, 0].clone()


def fast_and_readable(engine: PersonaPlex, rows: int) -> tuple[FrameRunner, FrameRunner]:
    fast = FrameRunner(engine.lm, engine.mimi, rows, use_graphs=True, kernels=Kernels.fast())
    readable = FrameRunner(engine.lm, engine.mimi, rows, use_graphs=False, kernels=READABLE_KERNELS)
    return fast, readable


# One row: the fast frame's depformer is the fused kernel (`Kernels.fast()`); two: compiled.
@pytest.mark.parametrize("rows", [1, 2])
def test_graphed_frame_equals_readable_frame_over_many_frames(gpu_engine, rows):
    fast, readable = fast_and_readable(gpu_engine, rows)
    persona = gpu_engine.persona()
    for runner in (fast, readable):
        for row in range(rows):
            runner.join(row, persona, GREEDY)
    pcm = audio(FRAMES, rows, seed=0)
    listens = torch.tensor([False, True])[:rows]
    for frame in range(FRAMES):
        listening = listens & (frame < FRAMES // 2)
        fast_tokens, fast_pcm = run(fast, pcm[frame], listening)
        readable_tokens, readable_pcm = run(readable, pcm[frame], listening)
        assert torch.equal(fast_tokens, readable_tokens), f"frame {frame}"
        error = float((fast_pcm - readable_pcm).norm() / readable_pcm.norm().clamp(min=1e-12))
        assert error < 1e-4, f"frame {frame}: pcm relative error {error}"
    assert fast.compile_frame and fast._compiled_parts is not None  # compiled, not fallen back


def test_rows_join_and_leave_between_graph_replays(gpu_engine):
    """Each row of a graphed batch gives what the same conversation gives alone (eager, B=1),
    whenever it joins, while other rows come and go."""
    fast = FrameRunner(gpu_engine.lm, gpu_engine.mimi, 3, use_graphs=True)
    persona = gpu_engine.persona()
    pcm = audio(20, 3, seed=1)
    joins = {0: 0, 1: 5, 2: 8}  # row -> frame it joins at
    leaves = {1: 14}
    got: dict[int, list[torch.Tensor]] = {row: [] for row in joins}
    for frame in range(20):
        for row, at in joins.items():
            if frame == at:
                fast.join(row, persona, GREEDY, seed=row)
        for row, at in leaves.items():
            if frame == at:
                fast.leave(row)
        tokens, _ = run(fast, pcm[frame])
        for row, at in joins.items():
            if at <= frame < leaves.get(row, 20):
                got[row].append(tokens[row])
    for row, at in joins.items():
        alone = FrameRunner(gpu_engine.lm, gpu_engine.mimi, 1, use_graphs=False)
        alone.join(0, persona, GREEDY, seed=row)
        expected = [run(alone, pcm[frame, row : row + 1])[0][0] for frame in range(at, leaves.get(row, 20))]
        assert torch.equal(torch.stack(got[row]), torch.stack(expected)), f"row {row}"


def test_frames_launched_back_to_back_equal_frames_run_one_at_a_time(gpu_engine):
    """`launch` lets the next frame's parts overlap this frame's on the device (three graphs on
    three streams): every frame's results, copied to the host as they come, are those of frames
    run and waited for one at a time, also across a row that joins and one that leaves."""
    persona = gpu_engine.persona()
    pcm = audio(24, 2, seed=4)
    listens = torch.zeros(2, dtype=torch.bool)
    runners = [FrameRunner(gpu_engine.lm, gpu_engine.mimi, 2, use_graphs=True) for _ in range(2)]
    results: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    for kind, runner in enumerate(runners):
        runner.join(0, persona, GREEDY, seed=0)
        for frame in range(24):
            if frame == 9:
                runner.join(1, persona, GREEDY, seed=1)
            if frame == 17:
                runner.leave(0)
            if kind == 0:
                results[0].append(run(runner, pcm[frame], listens))
            else:
                host = (torch.zeros(2, 1920, pin_memory=True), torch.zeros(runner.tokens.shape, dtype=torch.long, pin_memory=True))
                runner.launch(pcm[frame].pin_memory(), listens, results=host)
                results[1].append(host[::-1])
        torch.cuda.synchronize()
    for frame, ((tokens, frame_pcm), (got_tokens, got_pcm)) in enumerate(zip(*results)):
        # Only rows holding a conversation: a free row samples from a stream nobody seeded.
        rows = [row for row, (start, end) in enumerate(((0, 17), (9, 24))) if start <= frame < end]
        assert torch.equal(tokens.cpu()[rows], got_tokens[rows]), f"frame {frame}"
        # Two runners' graphs may run other cuBLAS kernels (their buffers' alignments differ): rounding.
        expected = frame_pcm.cpu()[rows]
        error = float((got_pcm[rows] - expected).norm() / expected.norm().clamp(min=1e-12))
        assert error < 1e-4, f"frame {frame}: pcm relative error {error}"


def test_a_frame_that_is_not_valid_is_silent_in_the_graph(gpu_engine):
    fast = FrameRunner(gpu_engine.lm, gpu_engine.mimi, 2, use_graphs=True)
    fast.join(1, gpu_engine.persona(), GREEDY)
    for _ in range(2):  # capture, then replay
        _, pcm = run(fast, torch.full((2, 1920), 0.1))
        assert fast.valid.tolist() == [False, True]
        assert float(pcm[0].abs().max()) == 0.0 and float(pcm[1].abs().max()) > 0.0


def test_public_calls_run_the_graphed_frame_and_match_the_readable_one(gpu_engine, tiny_folder):
    # As many rows as the graphed engine: the same batch shape runs the same matmul kernels, so
    # float32 rounding cannot flip a near-tied greedy choice of the tiny random model.
    readable = PersonaPlex.from_pretrained(tiny_folder, device="cuda", dtype=torch.float32, max_sessions=3,
                                           use_graphs=False)
    assert gpu_engine.scheduler.runner.use_graphs and not readable.scheduler.runner.use_graphs
    recording = audio(12, 1, seed=2)[:, 0].reshape(-1).numpy()
    fast_reply = gpu_engine.respond_duplex(recording, greedy=True)
    readable_reply = readable.respond_duplex(recording, greedy=True)
    assert fast_reply.text_tokens == readable_reply.text_tokens
    assert [f.agent_codes for f in fast_reply.frames] == [f.agent_codes for f in readable_reply.frames]
    np.testing.assert_allclose(fast_reply.audio, readable_reply.audio, atol=1e-4)


def test_overlapped_frames_hand_out_what_frames_one_at_a_time_do(gpu_engine):
    """On CUDA a due frame is launched before the one in flight is handed out, through pinned
    host buffers used in turn: every frame's audio, text and codes are those of frames run
    and handed out one at a time."""
    scheduler = gpu_engine.scheduler
    assert scheduler.overlap_frames
    recording = audio(20, 1, seed=3)[:, 0].reshape(-1).numpy()
    overlapped = gpu_engine.respond_duplex(recording, greedy=True), gpu_engine.respond(recording, greedy=True, max_steps=6)
    scheduler.overlap_frames = False
    try:
        one_at_a_time = gpu_engine.respond_duplex(recording, greedy=True), gpu_engine.respond(recording, greedy=True, max_steps=6)
    finally:
        scheduler.overlap_frames = True
    for got, expected in zip(overlapped, one_at_a_time):
        assert got.text_tokens == expected.text_tokens
        assert [f.agent_codes for f in got.frames] == [f.agent_codes for f in expected.frames]
        np.testing.assert_array_equal(got.audio, expected.audio)
