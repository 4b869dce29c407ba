import torch

from personaplex.cli.main import main
from personaplex.model.config import LMConfig
from personaplex.runtime.capacity import RESERVED_BYTES, kv_bytes_per_session, sessions_that_fit


def test_kv_cache_of_the_7b_model():
    assert kv_bytes_per_session(LMConfig()) == 32 * 2 * 3000 * 4096 * 2  # 1.57 GB, as the spec says
    assert kv_bytes_per_session(LMConfig(), torch.float8_e4m3fn) == 32 * 2 * 3000 * 4096


def test_sessions_that_fit_on_an_80_gb_card_after_bf16_weights():
    free = int(62.5e9)  # what an H100 has left after 17.2 GB of bf16 weights and Mimi
    assert sessions_that_fit(LMConfig(), free) == (free - RESERVED_BYTES) // 1_572_864_000 == 37
    assert sessions_that_fit(LMConfig(), free, torch.float8_e4m3fn) == 75
    assert sessions_that_fit(LMConfig(), RESERVED_BYTES // 2) == 0


def test_bench_command_is_registered_and_needs_a_gpu(capsys):
    try:
        code = main(["bench", "--sessions", "1", "--no-upstream"])
    except SystemExit as exit:
        code = exit.code
    assert code != 0 and "CUDA GPU" in str(code) + capsys.readouterr().err
