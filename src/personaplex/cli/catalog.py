"""`personaplex voices` and `personaplex prompts`: what can be chosen, without loading a model."""

from __future__ import annotations

import argparse
import textwrap

from personaplex.runtime.prompts import PROMPT_PRESETS, resolve_prompt
from personaplex.runtime.voices import DEFAULT_VOICE, VOICE_NAMES

# Voice name prefixes as the PersonaPlex README describes them.
_VOICE_KINDS = {
    "NATF": "natural, female",
    "NATM": "natural, male",
    "VARF": "variety, female",
    "VARM": "variety, male",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    voices = subparsers.add_parser(
        "voices",
        help="list the preset voices",
        description="List the preset voices (for --voice): natural (NAT) or varied (VAR), female "
        "(F) or male (M). Any WAV recording can be a voice too: --voice-wav FILE.",
    )
    voices.set_defaults(func=list_voices)

    prompts = subparsers.add_parser(
        "prompts",
        help="list the system prompt presets",
        description="List the presets, or print one preset's text (for --system-prompt).",
    )
    prompts.add_argument("name", nargs="?", help="print only this preset's text")
    prompts.set_defaults(func=list_prompts)


def list_voices(_: argparse.Namespace) -> int:
    for name in VOICE_NAMES:
        default = " (default)" if name == DEFAULT_VOICE else ""
        print(f"{name}  {_VOICE_KINDS[name[:4]]}{default}")
    return 0


def list_prompts(args: argparse.Namespace) -> int:
    if args.name is not None:
        print(resolve_prompt(preset=args.name))
        return 0
    for name, text in PROMPT_PRESETS.items():
        print(name)
        print(textwrap.indent(textwrap.fill(text, width=88), "    "))
    return 0
