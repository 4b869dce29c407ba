"""`personaplex respond IN.wav -o OUT.wav`: the model's spoken answer to a recording.

Two modes:
- turn-based (default): the model listens to the whole recording, then speaks for
  `--max-steps` frames (80 ms each);
- `--duplex`: full duplex over the file, one agent frame per input frame, so the reply
  is as long as the input and may overlap it, as in a live conversation.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from personaplex.audio.io import read_voice_wav, read_wav, write_wav
from personaplex.cli.arguments import (
    MAX_STEPS_HELP,
    check_device,
    check_local_model_config,
    check_voice_choice,
    command_line_text,
    reply_frames,
    writable_output,
)
from personaplex.errors import PersonaPlexError
from personaplex.hub import DEFAULT_REPO
from personaplex.runtime.prompts import PROMPT_PRESETS, resolve_prompt
from personaplex.runtime.validation import DEFAULT_STEPS
from personaplex.runtime.voices import DEFAULT_VOICE, is_wav_voice


@dataclass
class Reply:
    """What the command writes, gathered from either engine call."""

    audio: np.ndarray  # float32, 24 kHz
    text: str
    frames: list[dict[str, Any]]  # one JSON object per generated frame


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "respond",
        help="answer a recorded question: audio file in, WAV out",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="the user's audio (WAV, FLAC, MP3 or Ogg)")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="WAV file to write (its folder must exist)"
    )
    parser.add_argument(
        "--model", help=f"local model folder or Hugging Face repo id (default {DEFAULT_REPO})"
    )
    voice = parser.add_mutually_exclusive_group()
    voice.add_argument(
        "--voice",
        default=DEFAULT_VOICE,
        help=f"preset voice (`personaplex voices`) or a .pt/.safetensors file ({DEFAULT_VOICE})",
    )
    voice.add_argument("--voice-wav", type=Path, help="speak in the voice of this recording")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", help="the persona, in plain text")
    prompt.add_argument(
        "--prompt-preset",
        help=f"a named persona, one of: {', '.join(PROMPT_PRESETS)} (without this flag or "
        "--system-prompt: the one named default)",
    )
    parser.add_argument(
        "--max-steps",
        type=reply_frames,
        help=f"frames to speak after the input, 12.5 per second, {MAX_STEPS_HELP} ({DEFAULT_STEPS})",
    )
    parser.add_argument("--seed", type=int, help="random seed, for a reproducible reply")
    parser.add_argument("--greedy", action="store_true", help="always pick the likeliest token")
    parser.add_argument("--json", type=Path, help="also write the text, frame by frame, as JSON")
    parser.add_argument(
        "--codes", action="store_true", help="add each frame's audio codes to --json"
    )
    parser.add_argument("--duplex", action="store_true", help="full duplex over the whole file")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: best available)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Everything cheap is checked before the model loads, which takes a while.
    _check_flag_combinations(args)
    system_prompt = resolve_prompt(args.prompt_preset, command_line_text("--system-prompt", args.system_prompt))
    writable_output("--output", args.output)
    if args.json is not None:
        writable_output("--json", args.json)
    check_device(args.device)
    check_local_model_config(args.model)
    persona = _persona_arguments(args, system_prompt)
    if persona["voice_wav"] is not None:
        read_voice_wav(persona["voice_wav"])  # a bad recording is named now, not after loading
    else:
        check_voice_choice(persona["voice"], args.model)
    audio, sample_rate = read_wav(args.input)

    from personaplex.api import PersonaPlex  # the engine pulls in the model code: only now

    # One recording per process: compiling the frame (minutes) would cost far more than the
    # few milliseconds per frame it saves, so the graphed frame runs as written.
    engine = PersonaPlex.from_pretrained(args.model, device=args.device, progress=_show_progress, compile_frame=False)
    if args.duplex:
        reply = _duplex_reply(engine, audio, sample_rate, persona, args.codes)
    else:
        max_steps = args.max_steps or DEFAULT_STEPS
        reply = _turn_based_reply(engine, audio, sample_rate, persona, max_steps, args.codes)

    write_wav(args.output, reply.audio, engine.sample_rate)
    written = [f"{args.output} ({reply.audio.shape[-1] / engine.sample_rate:.1f} s of audio)"]
    if args.json is not None:
        _write_json(args.json, reply)
        written.append(f"{args.json} (text by frame)")
    print(f"wrote {' and '.join(written)}", file=sys.stderr)
    print(reply.text.strip())
    return 0


def _show_progress(progress: Any) -> None:
    """Loading takes a while (a 16.7 GB download the first time): say what is happening."""
    print(f"[{progress.elapsed_s:6.1f} s] {progress.message}", file=sys.stderr)


def _check_flag_combinations(args: argparse.Namespace) -> None:
    if args.codes and args.json is None:
        raise PersonaPlexError("--codes adds the audio codes to the JSON output: give --json too")
    if args.duplex and args.max_steps is not None:
        raise PersonaPlexError(
            "--duplex replies for exactly as long as the input: drop --max-steps"
        )


def _persona_arguments(args: argparse.Namespace, system_prompt: str) -> dict[str, Any]:
    """The keyword arguments shared by every engine call."""
    voice_wav = args.voice_wav
    voice = args.voice
    if voice_wav is None and is_wav_voice(voice):
        voice_wav, voice = Path(voice), DEFAULT_VOICE  # `--voice me.wav` means --voice-wav
    return {
        "voice": voice,
        "voice_wav": None if voice_wav is None else str(voice_wav),
        "system_prompt": system_prompt,
        "seed": args.seed,
        "greedy": args.greedy,
    }


def _turn_based_reply(
    engine: Any,
    audio: np.ndarray,
    sample_rate: int,
    persona: dict[str, Any],
    max_steps: int,
    with_codes: bool,
) -> Reply:
    # Two bars: hearing the input and speaking run at different speeds, so one bar over
    # both would show a wrong ETA.
    with tqdm(total=_frame_count(engine, audio, sample_rate), unit="frame", desc="listening", leave=False) as heard:
        stream = engine.respond_stream(
            audio, sample_rate=sample_rate, max_steps=max_steps, on_listen=heard.update, **persona
        )
        first = next(iter(stream), None)
    chunks = [] if first is None else [first]
    with tqdm(total=max_steps, initial=len(chunks), unit="frame", desc="speaking", leave=False) as spoken:
        for chunk in stream:
            chunks.append(chunk)
            spoken.update()
    audio_out = np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, np.float32)
    text = "".join(c.text for c in chunks).strip()
    return Reply(audio=audio_out, text=text, frames=[_frame_entry(c, c.frame_index, with_codes) for c in chunks])


def _duplex_reply(engine: Any, audio: np.ndarray, sample_rate: int, persona: dict[str, Any], with_codes: bool) -> Reply:
    with tqdm(total=_frame_count(engine, audio, sample_rate), unit="frame", desc="conversing", leave=False) as bar:
        response = engine.respond_duplex(audio, sample_rate=sample_rate, on_chunk=lambda _: bar.update(), **persona)
    frames = [_frame_entry(f, f.frame_index, with_codes) for f in response.frames]
    return Reply(audio=response.audio, text=response.text, frames=frames)


def _frame_count(engine: Any, audio: np.ndarray, sample_rate: int) -> int:
    """80 ms frames the engine makes of `audio` once resampled to its rate."""
    return -(-int(audio.shape[-1] * engine.sample_rate / sample_rate) // engine.frame_samples)


def _frame_entry(frame: Any, index: int, with_codes: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": index, "text": frame.text}
    if with_codes:
        entry["text_token"] = frame.text_token
        entry["agent_codes"] = list(frame.agent_codes)
    return entry


def _write_json(path: Path, reply: Reply) -> None:
    document = {"text": reply.text, "frames": reply.frames}
    path.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
