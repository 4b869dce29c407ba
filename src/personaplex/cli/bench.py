"""`personaplex bench`: the GPU benchmark (`personaplex.bench`) from the command line."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from personaplex import bench

    parser = subparsers.add_parser("bench", help="time frames on this machine's GPU (ours and upstream's)",
                                   description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(parser)
    parser.set_defaults(func=bench.run)
