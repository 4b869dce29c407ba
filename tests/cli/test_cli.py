import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import personaplex.api
from personaplex.audio.io import FRAME_SAMPLES, SAMPLE_RATE, read_wav, write_wav
from personaplex.cli import main as cli_main
from personaplex.cli.main import main
from personaplex.runtime.prompts import DEFAULT_PROMPT, PROMPT_PRESETS
from personaplex.runtime.voices import VOICE_NAMES


def tone_file(path: Path, seconds: float = 0.5, rate: int = 16_000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    write_wav(path, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), rate)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("personaplex: error: ")
    return lines[0]


# --- A stand-in engine with the documented API, to test the command without a model. ---


@dataclass
class FakeFrame:
    frame_index: int
    text: str
    text_token: int
    agent_codes: list[int]


@dataclass
class FakeResponse:
    audio: np.ndarray
    text_tokens: list[int]
    text: str
    frames: list[FakeFrame]


@dataclass
class FakeChunk:
    pcm: np.ndarray
    text: str
    frame_index: int
    elapsed_ms: float = 1.0
    text_token: int = 3
    agent_codes: list[int] = field(default_factory=list)


@dataclass
class FakeEngine:
    calls: list = field(default_factory=list)
    sample_rate: int = SAMPLE_RATE
    frame_samples: int = FRAME_SAMPLES
    loaded_with: tuple = ()

    @classmethod
    def from_pretrained(cls, source=None, device=None, dtype=None, progress=None, compile_frame=None):
        engine = cls()
        engine.loaded_with = (source, device, compile_frame)
        FakeEngine.last = engine
        return engine

    def _response(self, frames: int) -> FakeResponse:
        words = [" hi" if i % 2 else "" for i in range(frames)]
        return FakeResponse(
            audio=np.full(frames * FRAME_SAMPLES, 0.1, np.float32),
            text_tokens=[5 if w else 3 for w in words],
            text="".join(words),
            frames=[FakeFrame(i, w, 5 if w else 3, [i] * 8) for i, w in enumerate(words)],
        )

    def respond(self, audio, **kwargs):
        self.calls.append(("respond", audio, kwargs))
        return self._response(kwargs["max_steps"])

    def respond_stream(self, audio, **kwargs):
        on_listen = kwargs.pop("on_listen")
        self.calls.append(("respond_stream", audio, kwargs))
        for _ in range(-(-round(len(audio) * SAMPLE_RATE / kwargs["sample_rate"]) // FRAME_SAMPLES)):
            on_listen()
        for frame in self._response(kwargs["max_steps"]).frames:
            yield FakeChunk(np.full(FRAME_SAMPLES, 0.1, np.float32), frame.text, frame.frame_index,
                            text_token=frame.text_token, agent_codes=frame.agent_codes)

    def respond_duplex(self, audio, **kwargs):
        self.calls.append(("respond_duplex", audio, kwargs))
        frames = -(-round(len(audio) * SAMPLE_RATE / kwargs["sample_rate"]) // FRAME_SAMPLES)
        response = self._response(frames)
        for frame in response.frames:
            kwargs["on_chunk"](frame)
        return response


@pytest.fixture
def fake_engine(monkeypatch):
    monkeypatch.setattr(personaplex.api, "PersonaPlex", FakeEngine)
    return FakeEngine


# --- voices / prompts ---


def test_voices_lists_all_presets(capsys):
    assert main(["voices"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(VOICE_NAMES)
    assert "natural, female" in lines[0] and "(default)" in "".join(lines)


def test_prompts_lists_presets(capsys):
    assert main(["prompts"]) == 0
    out = capsys.readouterr().out
    for name in PROMPT_PRESETS:
        assert f"\n{name}\n" in f"\n{out}"
    assert "wise and friendly teacher" in out


def test_prompts_prints_one_preset(capsys):
    assert main(["prompts", "teacher"]) == 0
    assert capsys.readouterr().out.strip() == PROMPT_PRESETS["teacher"]
    assert main(["prompts", "pirate"]) == 1
    assert "unknown prompt preset 'pirate'" in one_error_line(capsys)


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


# --- respond: argument and error handling ---


def test_respond_missing_input(tmp_path, capsys, fake_engine):
    code = main(["respond", str(tmp_path / "nope.wav"), "-o", str(tmp_path / "out.wav")])
    assert code == 1 and "does not exist" in one_error_line(capsys)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--codes"], "give --json too"),
        (["--duplex", "--max-steps", "5"], "drop --max-steps"),
        (["--prompt-preset", "pirate"], "unknown prompt preset"),
    ],
)
def test_respond_bad_flag_combinations_fail_before_loading(
    tmp_path, capsys, fake_engine, extra, message
):
    FakeEngine.last = None
    wav = tone_file(tmp_path / "in.wav")
    assert main(["respond", str(wav), "-o", str(tmp_path / "o.wav"), *extra]) == 1
    assert message in one_error_line(capsys)
    assert FakeEngine.last is None and not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--voice", "NATF0", "--voice-wav", "x.wav"],
        ["--system-prompt", "hi", "--prompt-preset", "teacher"],
        ["--max-steps", "0"],
        ["--max-steps", "501"],
        ["--max-steps", "many"],
    ],
)
def test_respond_usage_errors(tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as exit_info:
        main(["respond", "in.wav", "-o", str(tmp_path / "o.wav"), *extra])
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_respond_engine_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from personaplex.errors import ModelUnavailableError

    class Unavailable:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise ModelUnavailableError("nvidia/personaplex-7b-v1 is gated: accept its licence")

    monkeypatch.setattr(personaplex.api, "PersonaPlex", Unavailable)
    wav = tone_file(tmp_path / "in.wav")
    assert main(["respond", str(wav), "-o", str(tmp_path / "o.wav")]) == 1
    assert "is gated" in one_error_line(capsys)


# --- respond with a stand-in engine ---


def test_respond_turn_based(tmp_path, capsys, fake_engine):
    wav = tone_file(tmp_path / "in.wav", rate=16_000)
    out, js = tmp_path / "reply.wav", tmp_path / "reply.json"
    args = ["respond", str(wav), "-o", str(out), "--json", str(js), "--max-steps", "6"]
    args += ["--model", "some/repo", "--device", "cpu", "--seed", "7", "--greedy"]
    assert main(args) == 0
    engine = FakeEngine.last
    assert engine.loaded_with == ("some/repo", "cpu", False)  # one recording: no frame compilation
    kind, audio, kwargs = engine.calls[0]
    assert kind == "respond_stream" and audio.shape == (8000,)
    assert kwargs == {
        "sample_rate": 16_000, "max_steps": 6, "voice": "NATM0", "voice_wav": None,
        "system_prompt": DEFAULT_PROMPT, "seed": 7, "greedy": True,
    }
    pcm, rate = read_wav(out)
    assert rate == SAMPLE_RATE and pcm.shape == (6 * FRAME_SAMPLES,)
    document = json.loads(js.read_text())
    assert document["text"] == "hi hi hi"
    assert document["frames"][1] == {"index": 1, "text": " hi"} and len(document["frames"]) == 6
    captured = capsys.readouterr()
    assert captured.out.strip() == "hi hi hi"
    assert f"wrote {out} (0.5 s of audio) and {js} (text by frame)" in captured.err



def test_respond_shows_progress_while_listening_then_speaking(tmp_path, fake_engine, monkeypatch):
    from tqdm import tqdm

    import personaplex.cli.respond as respond

    bars = {}

    class RecordedBar(tqdm):
        def close(self):
            bars[self.desc] = (self.n, self.total)
            super().close()

    monkeypatch.setattr(respond, "tqdm", RecordedBar)
    wav = tone_file(tmp_path / "in.wav", seconds=1.0, rate=16_000)
    assert main(["respond", str(wav), "-o", str(tmp_path / "o.wav"), "--max-steps", "4"]) == 0
    # 1 s of input is 13 frames heard; the reply gets its own bar, so its ETA is its own.
    assert bars == {"listening": (13, 13), "speaking": (4, 4)}


def test_respond_codes_and_persona(tmp_path, fake_engine):
    wav = tone_file(tmp_path / "in.wav")
    voice_wav = tone_file(tmp_path / "me.wav")
    js = tmp_path / "r.json"
    args = ["respond", str(wav), "-o", str(tmp_path / "o.wav"), "--json", str(js), "--codes"]
    args += ["--voice", str(voice_wav), "--prompt-preset", "teacher", "--max-steps", "3"]
    assert main(args) == 0
    kind, _, kwargs = FakeEngine.last.calls[0]
    assert kind == "respond_stream" and kwargs["voice_wav"] == str(voice_wav)
    assert kwargs["system_prompt"] == PROMPT_PRESETS["teacher"]
    frame = json.loads(js.read_text())["frames"][2]
    assert frame == {"index": 2, "text": "", "text_token": 3, "agent_codes": [2] * 8}


def test_respond_duplex(tmp_path, fake_engine):
    wav = tone_file(tmp_path / "in.wav", seconds=1.0, rate=SAMPLE_RATE)
    out = tmp_path / "o.wav"
    assert main(["respond", str(wav), "-o", str(out), "--duplex", "--system-prompt", "Hi."]) == 0
    kind, _, kwargs = FakeEngine.last.calls[0]
    assert kind == "respond_duplex" and "max_steps" not in kwargs
    assert kwargs["system_prompt"] == "Hi."
    pcm, _ = read_wav(out)
    assert pcm.shape == (13 * FRAME_SAMPLES,)


# --- optional server commands ---


def test_optional_command_registration(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_ok_cmd.py").write_text(
        "def register(subparsers):\n"
        "    p = subparsers.add_parser('okcmd')\n"
        "    p.set_defaults(func=lambda args: 0)\n"
    )
    (tmp_path / "fake_broken_cmd.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        cli_main,
        "_SERVER_COMMANDS",
        {"okcmd": "fake_ok_cmd", "broken": "fake_broken_cmd", "absent": "fake_absent_cmd"},
    )
    assert main(["okcmd"]) == 0
    assert main(["broken", "--port", "1"]) == 1
    assert "needs the package 'not_a_real_dependency_xyz'" in one_error_line(capsys)
    with pytest.raises(SystemExit):
        main(["absent"])
    for name in ("fake_ok_cmd", "fake_broken_cmd"):
        sys.modules.pop(name, None)


def test_missing_package_at_run_time_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_lazy_cmd.py").write_text(
        "def run(args):\n"
        "    import not_installed_server_xyz\n"
        "def register(subparsers):\n"
        "    subparsers.add_parser('lazy').set_defaults(func=run)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli_main, "_SERVER_COMMANDS", {"lazy": "fake_lazy_cmd"})
    assert main(["lazy"]) == 1
    assert "needs the package 'not_installed_server_xyz'" in one_error_line(capsys)
    sys.modules.pop("fake_lazy_cmd", None)


def test_parser_has_all_commands():
    parser = cli_main.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"respond", "voices", "prompts"} <= set(commands.choices)


# --- end to end on a tiny random model folder ---


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    from tests.fixtures.tiny_model import make_tiny_model_folder

    # The default system prompt needs ~100 frames of context with the tiny tokenizer.
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny_model"), context=256)


def noise_file(path: Path, seconds: float, rate: int) -> Path:
    noise = 0.1 * np.random.default_rng(0).standard_normal(int(seconds * rate))
    write_wav(path, noise.astype(np.float32), rate)
    return path


def test_end_to_end_turn_based(tmp_path, tiny_model_folder, capsys):
    wav = noise_file(tmp_path / "question.wav", seconds=0.3, rate=16_000)
    out, js = tmp_path / "answer.wav", tmp_path / "answer.json"
    args = ["respond", str(wav), "-o", str(out), "--json", str(js), "--max-steps", "3"]
    args += ["--model", str(tiny_model_folder), "--device", "cpu", "--seed", "1"]
    assert main(args) == 0, capsys.readouterr().err
    pcm, rate = read_wav(out)
    assert rate == SAMPLE_RATE and pcm.shape == (3 * FRAME_SAMPLES,)
    assert np.all(np.isfinite(pcm))
    document = json.loads(js.read_text())
    assert [frame["index"] for frame in document["frames"]] == [0, 1, 2]
    assert document["text"] == "".join(frame["text"] for frame in document["frames"]).strip()


def test_end_to_end_duplex_with_codes(tmp_path, tiny_model_folder, capsys):
    wav = noise_file(tmp_path / "talk.wav", seconds=0.3, rate=SAMPLE_RATE)
    out, js = tmp_path / "duplex.wav", tmp_path / "duplex.json"
    args = ["respond", str(wav), "-o", str(out), "--json", str(js), "--codes", "--duplex"]
    args += ["--model", str(tiny_model_folder), "--device", "cpu", "--greedy"]
    args += ["--voice", "VARF1", "--prompt-preset", "conversation"]
    assert main(args) == 0, capsys.readouterr().err
    pcm, rate = read_wav(out)
    assert rate == SAMPLE_RATE and pcm.shape == (7200,)  # as long as the input
    frames = json.loads(js.read_text())["frames"]
    assert len(frames) == 4  # ceil(7200 / 1920)
    for frame in frames:
        assert len(frame["agent_codes"]) == 8 and isinstance(frame["text_token"], int)
        assert all(0 <= code < 2048 for code in frame["agent_codes"])


# --- respond: bad input is one line, before the model loads ---


def _bad_input_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    from tests.fixtures.wav_files import float_wav, wav_with_header

    good = tone_file(tmp_path / "in.wav")
    nan = np.zeros(4_800, np.float32)
    nan[7] = np.nan
    return {
        "0 Hz input": ([str(wav_with_header(tmp_path / "z.wav", 0, np.zeros(100)))], "sample rate is 0 Hz"),
        "1 Hz input": ([str(wav_with_header(tmp_path / "one.wav", 1, np.zeros(200)))], "sample rate is 1 Hz"),
        "header-only input": ([str(wav_with_header(tmp_path / "h.wav", 16_000))], "holds no samples"),
        "header-only voice": ([str(good), "--voice-wav", str(wav_with_header(tmp_path / "hv.wav", 16_000))],
                              "hv.wav holds no samples"),
        "0 Hz voice": ([str(good), "--voice-wav", str(wav_with_header(tmp_path / "zv.wav", 0, np.zeros(9)))],
                       "sample rate is 0 Hz"),
        "NaN voice": ([str(good), "--voice-wav", str(float_wav(tmp_path / "nan.wav", nan))],
                      "voice recording .*nan.wav contains NaN"),
        "long voice": ([str(good), "--voice", str(wav_with_header(tmp_path / "long.wav", 8_000, np.zeros(8_000 * 40)))],
                       "voice recording .*long.wav lasts 40.0 s"),
        "unknown voice": ([str(good), "--voice", "NOPE"], "unknown voice 'NOPE'"),
        "missing voice file": ([str(good), "--voice", str(tmp_path / "gone.pt")], "gone.pt does not exist"),
        "prompt not UTF-8": ([str(good), "--system-prompt", b"caf\xe9".decode("utf-8", "surrogateescape")],
                             "--system-prompt is not valid UTF-8"),
        "output is a folder": ([str(good), "-o", str(tmp_path)], "is a folder"),
        "output folder missing": ([str(good), "-o", str(tmp_path / "no" / "r.wav")], "does not exist: create it"),
        "output in /proc": ([str(good), "-o", "/proc/reply.wav"], "/proc/reply.wav"),
        "json folder missing": ([str(good), "--json", str(tmp_path / "no" / "r.json")], "--json .*does not exist"),
        "bad device": ([str(good), "--device", "toaster"], "not a torch device"),
    }


CASES = [
    "0 Hz input", "1 Hz input", "header-only input", "header-only voice", "0 Hz voice", "NaN voice",
    "long voice", "unknown voice", "missing voice file", "prompt not UTF-8", "output is a folder",
    "output folder missing", "output in /proc", "json folder missing", "bad device",
]


@pytest.mark.parametrize("case", CASES)
def test_respond_bad_input_is_one_line_before_loading(tmp_path, capfd, fake_engine, case):
    import re

    FakeEngine.last = None
    arguments, message = _bad_input_cases(tmp_path)[case]
    if "-o" not in arguments:
        arguments = [*arguments, "-o", str(tmp_path / "o.wav")]
    assert main(["respond", *arguments]) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err and "panicked" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("personaplex: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert FakeEngine.last is None  # refused before the model loaded


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_respond_cuda_without_cuda_is_one_line_before_loading(tmp_path, capsys, fake_engine):
    FakeEngine.last = None
    wav = tone_file(tmp_path / "in.wav")
    assert main(["respond", str(wav), "-o", str(tmp_path / "o.wav"), "--device", "cuda"]) == 1
    assert "no CUDA GPU" in one_error_line(capsys) and FakeEngine.last is None


def test_respond_voice_saved_in_a_local_model_folder_is_accepted(tmp_path, fake_engine):
    (tmp_path / "model" / "voices").mkdir(parents=True)
    (tmp_path / "model" / "voices" / "Mine.pt").write_bytes(b"")
    wav = tone_file(tmp_path / "in.wav")
    arguments = ["respond", str(wav), "-o", str(tmp_path / "o.wav"), "--model", str(tmp_path / "model")]
    assert main([*arguments, "--voice", "Mine"]) == 0
    assert FakeEngine.last.calls[0][2]["voice"] == "Mine"


@pytest.mark.parametrize("config", ['{"num_heads": 0}', '{"dim": "many"}', '{"context": 1e9}', "[" * 50_000 + "]" * 50_000])
def test_respond_bad_model_config_is_one_line(tmp_path, capsys, config):
    from personaplex.hub import REQUIRED_FILES

    folder = tmp_path / "model"
    folder.mkdir()
    for name in REQUIRED_FILES:
        (folder / name).write_bytes(b"x")
    (folder / "config.json").write_text(config)
    wav = tone_file(tmp_path / "in.wav")
    assert main(["respond", str(wav), "-o", str(tmp_path / "o.wav"), "--model", str(folder)]) == 1
    assert "config.json" in one_error_line(capsys)


def test_output_into_a_closed_pipe_is_not_an_error(tmp_path):
    """`personaplex prompts | head -1`: the reader leaves; we end quietly."""
    import os
    import subprocess

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as after `head` exits
    code = "import sys; from personaplex.cli.main import main; sys.exit(main(['prompts']))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], stdout=write_end, stderr=subprocess.PIPE, env=env, timeout=60)
    os.close(write_end)
    assert result.returncode == 0 and result.stderr == b""


def test_every_command_describes_itself(capsys):
    for command in ("voices", "prompts", "respond"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = capsys.readouterr().out
        description = help_text.split("\n\n")[1]
        assert not description.startswith(("options:", "positional arguments:")), f"`{command} --help` has no description"
    with pytest.raises(SystemExit):
        main(["respond", "--help"])
    assert "astronaut (default)" not in " ".join(capsys.readouterr().out.split())  # as if astronaut were it


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_respond_into_a_full_device_is_one_line(tmp_path, capsys, fake_engine):
    wav = tone_file(tmp_path / "in.wav")
    assert main(["respond", str(wav), "-o", "/dev/full", "--max-steps", "2"]) == 1
    err = capsys.readouterr().err
    last_line = err.strip().split("\r")[-1]  # after the progress bars, which clear themselves
    assert "Traceback" not in err and last_line.startswith("personaplex: error: cannot write audio file /dev/full")
    assert "No space left on device" in last_line
