"""The `personaplex` command: one subcommand per module.

Every subcommand module exposes `register(subparsers) -> None`, which adds its parser and
sets `func`, a function `(argparse.Namespace) -> int` (the exit status). Errors the user
can act on (PersonaPlexError, OSError) become one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from personaplex import __version__
from personaplex.cli import bench, catalog, respond
from personaplex.errors import PersonaPlexError

PROGRAM = "personaplex"
# Written separately (the server engineer's modules); they may need optional packages.
_SERVER_COMMANDS = {"serve": "personaplex.cli.serve", "chat": "personaplex.cli.chat"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="NVIDIA PersonaPlex: full-duplex speech-to-speech conversations.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    respond.register(subparsers)
    catalog.register(subparsers)
    bench.register(subparsers)
    for command, module_name in _SERVER_COMMANDS.items():
        _register_optional(subparsers, command, module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # Only a stand-in for an unavailable command takes any arguments (it ignores them).
    if unknown and not getattr(args, "ignores_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, so a closed pipe is seen below rather than at exit
        return status
    except BrokenPipeError:
        # Whoever read our output stopped early (`personaplex prompts | head`): not an error.
        # Point stdout at /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (PersonaPlexError, OSError) as err:
        print(f"{PROGRAM}: error: {err}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:  # commands import their optional packages when they run
        print(f"{PROGRAM}: error: {_missing_package_message(args.command, err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return 130


def _register_optional(
    subparsers: argparse._SubParsersAction, command: str, module_name: str
) -> None:
    """Register a command from a module that may be absent or lack its optional packages."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == module_name:
            return  # this installation has no such command
        _register_unavailable(subparsers, command, err)
        return
    module.register(subparsers)


def _missing_package_message(command: str, err: ImportError) -> str:
    return (
        f"`{PROGRAM} {command}` needs the package {err.name or str(err)!r}, which is not "
        "installed: install it (`pip install 'personaplex[server]'` has the server's packages)"
    )


def _register_unavailable(
    subparsers: argparse._SubParsersAction, command: str, err: ImportError
) -> None:
    """A stand-in command that explains which package to install instead of crashing."""
    missing = err.name or str(err)
    message = _missing_package_message(command, err)

    def explain(_: argparse.Namespace) -> int:
        raise PersonaPlexError(message)

    stand_in = subparsers.add_parser(command, help=f"(unavailable: needs {missing})")
    stand_in.set_defaults(func=explain, ignores_arguments=True)


if __name__ == "__main__":
    sys.exit(main())
