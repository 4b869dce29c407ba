"""The server process's malloc arenas: why turn-based conversations used to grow the server.

glibc gives each thread that allocates its own arena, up to 8 per core, and memory freed
in an arena stays there, fragmented. A turn-based conversation allocates in several
threads: Whisper (CTranslate2) in a worker thread, the reply in another, the VAD and
Opus on the event loop. Over hundreds of turns the arenas filled with fragments: the
server grew about 150 kB per turn (+65 MB over 300 turns on the tiny model), with no
Python object left behind (tracemalloc saw under 200 kB). With two arenas the same turns
leave the resident memory flat, and start lower. Large buffers (model weights, KV caches,
audio) are mmap'ed, not taken from arenas: the cap concerns only small allocations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

SERVER_MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h


def limit_malloc_arenas(count: int = SERVER_MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process (threads started later share them).

    Returns whether the cap is in force; False off glibc (macOS, musl), where it does not apply.
    """
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    try:
        mallopt = ctypes.CDLL(library).mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(ctypes.c_int(_M_ARENA_MAX), ctypes.c_int(count)))
    if not applied:
        logger.warning("could not cap malloc arenas at %d: memory may grow with turn-based conversations", count)
    return applied
