import pytest
import torch

from personaplex.cli.main import main
from personaplex.model.config import LMConfig
from personaplex.model.lm import LMModel
from personaplex.runtime.capacity import RESERVED_BYTES, kv_bytes_per_session, sessions_that_fit
from tests.fixtures.tiny_lm import tiny_lm_config


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_kv_bytes_are_what_a_conversation_allocates(kv_dtype):
    config = tiny_lm_config(context=40)
    with torch.device("meta"):
        state = LMModel(config).new_temporal_state(1, dtype=kv_dtype)
    allocated = state.keys.numel() * state.keys.element_size() + state.values.numel() * state.values.element_size()
    assert kv_bytes_per_session(config, kv_dtype) == allocated


def test_kv_cache_of_the_7b_model():
    assert round(kv_bytes_per_session(LMConfig()) / 1e9, 2) == 1.57  # as the spec says
    assert round(kv_bytes_per_session(LMConfig(), torch.float8_e4m3fn) / 1e9, 2) == 0.79


def test_sessions_that_fit_on_an_80_gb_card_after_bf16_weights():
    free = int(62.5e9)  # what an H100 has left after 17.2 GB of bf16 weights and Mimi
    assert sessions_that_fit(LMConfig(), free) == 37
    assert sessions_that_fit(LMConfig(), free, torch.float8_e4m3fn) == 75
    assert sessions_that_fit(LMConfig(), RESERVED_BYTES // 2) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the whole benchmark")
def test_bench_command_is_registered_and_needs_a_gpu(capsys):
    try:
        code = main(["bench", "--sessions", "1", "--no-upstream"])
    except SystemExit as exit:
        code = exit.code
    assert code != 0 and "CUDA GPU" in str(code) + capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [(["--weights", "bf16,int5"], "unknown weight format int5"),
                                          (["--sessions", "1,many"], "--sessions takes whole numbers")])
def test_bench_names_a_bad_flag_before_it_needs_a_gpu(capsys, flags, named):
    try:
        code = main(["bench", "--api", *flags])
    except SystemExit as exit:
        code = exit.code
    assert code != 0 and named in str(code) + capsys.readouterr().err
