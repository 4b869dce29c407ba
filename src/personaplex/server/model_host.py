"""Loads the engine (and the ASR model) in background threads and reports how far it got.

The server answers HTTP at once, so the page can show the download, load and warm-up
progress with their timings; conversations are refused with "model loading" until the
engine is ready. A model that cannot be had (gated repo, no token, bad folder) leaves the
server up, with the error in GET /api/status and on the page; the licence-and-token steps
come with it only when access to the gated repo is what is missing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from personaplex.errors import GatedModelError, PersonaPlexError
from personaplex.server.conversation import Engine

logger = logging.getLogger(__name__)

MODEL_HELP = (
    "PersonaPlex's weights (Hugging Face repo nvidia/personaplex-7b-v1) are gated. "
    "1) Accept the licence on https://huggingface.co/nvidia/personaplex-7b-v1 with your "
    "Hugging Face account. 2) Give this machine a token with read access: run `hf auth login`, "
    "or set HF_TOKEN=hf_... before starting the server (create one at "
    "https://huggingface.co/settings/tokens). 3) Restart `personaplex serve`. "
    "Offline, or with the files already downloaded: `personaplex serve --model DIR`."
)


class LoadReport(Protocol):
    """A progress report from the engine (personaplex.LoadProgress)."""

    stage: str  # download | load | warmup | ready
    fraction: float | None
    message: str


ProgressCallback = Callable[[LoadReport], None]
EngineLoader = Callable[[ProgressCallback], Engine]
TranscriberLoader = Callable[[], Any]


@dataclass
class _LoadState:
    state: str = "loading"  # loading | ready | error
    stage: str = "starting"
    fraction: float | None = None
    message: str = "starting"
    started_at: float = field(default_factory=time.monotonic)
    stage_started_at: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    help: str | None = None  # steps to fix the error, when they are more than its message says


class ModelHost:
    """Owns the engine and the ASR model once loaded; thread-safe status for the web side."""

    def __init__(
        self,
        load_engine: EngineLoader,
        load_transcriber: TranscriberLoader | None = None,
        asr_model_name: str | None = None,
    ) -> None:
        self._load_engine = load_engine
        self._load_transcriber = load_transcriber
        self._lock = threading.Lock()
        self._load = _LoadState()
        self._engine: Engine | None = None
        self._transcriber: Any = None
        self._asr = {
            "model": asr_model_name,
            "state": "off" if load_transcriber is None else "loading",
            "error": None,
        }

    def start(self) -> None:
        """Begin loading in the background; returns at once."""
        threading.Thread(target=self._load_engine_thread, name="personaplex-load", daemon=True).start()
        if self._load_transcriber is not None:
            threading.Thread(
                target=self._load_asr_thread,
                args=(self._load_transcriber,),
                name="personaplex-asr",
                daemon=True,
            ).start()

    @property
    def engine(self) -> Engine | None:
        """The engine once ready, else None."""
        return self._engine

    @property
    def transcriber(self) -> Any:
        """The ASR model once loaded, else None (turn-based chat then has no transcripts)."""
        return self._transcriber

    def not_ready_reason(self) -> str:
        """Why conversations cannot start yet, for the error message sent to clients."""
        with self._lock:
            if self._load.state == "error":
                return " ".join(filter(None, ("model unavailable:", self._load.error, self._load.help)))
            percent = "" if self._load.fraction is None else f" {self._load.fraction:.0%}"
            return (
                f"model loading ({self._load.stage}{percent}: {self._load.message}); "
                "try again when it is ready"
            )

    def status(self) -> dict[str, Any]:
        """Everything GET /api/status reports about loading."""
        with self._lock:
            load = self._load
            now = time.monotonic()
            finished_at = load.stage_started_at.get("ready", now)
            return {
                "state": load.state,
                "stage": load.stage,
                "fraction": load.fraction,
                "message": load.message,
                "elapsed_s": round(finished_at - load.started_at, 2),
                "timings": self._stage_timings(now),
                "error": load.error,
                "help": load.help,
                "asr": dict(self._asr),
            }

    def _stage_timings(self, now: float) -> dict[str, float]:
        """Seconds spent in each stage so far (a stage ends when the next one starts)."""
        starts = sorted(self._load.stage_started_at.items(), key=lambda item: item[1])
        timings = {}
        for index, (stage, started) in enumerate(starts):
            if stage == "ready":
                continue
            ended = starts[index + 1][1] if index + 1 < len(starts) else now
            timings[stage] = round(ended - started, 2)
        return timings

    def _on_progress(self, report: LoadReport) -> None:
        with self._lock:
            self._load.stage_started_at.setdefault(report.stage, time.monotonic())
            self._load.stage = report.stage
            self._load.fraction = report.fraction
            self._load.message = report.message

    def _load_engine_thread(self) -> None:
        try:
            engine = self._load_engine(self._on_progress)
        except GatedModelError as err:
            self._fail(str(err), MODEL_HELP)
        except PersonaPlexError as err:  # its message names the cause and the fix
            self._fail(str(err))
        except Exception as err:  # shown on the page rather than lost in a thread
            logger.exception("loading the model failed")
            self._fail(f"{type(err).__name__}: {err}")
        else:
            self._engine = engine
            with self._lock:
                self._load.state = "ready"
                self._load.stage_started_at.setdefault("ready", time.monotonic())
                self._load.stage = "ready"
                self._load.fraction = 1.0
                self._load.message = "ready"

    def _fail(self, message: str, help: str | None = None) -> None:
        logger.error("the model is unavailable: %s%s", message, f"\n{help}" if help else "")
        with self._lock:
            self._load.state = "error"
            self._load.error = message
            self._load.help = help
            self._load.message = "the model could not be loaded"

    def _load_asr_thread(self, load_transcriber: TranscriberLoader) -> None:
        try:
            self._transcriber = load_transcriber()
        except Exception as err:  # turn-based chat still works, without transcripts
            logger.warning("speech recognition is off: %s", err)
            with self._lock:
                self._asr.update(state="error", error=str(err))
        else:
            with self._lock:
                self._asr.update(state="ready")
