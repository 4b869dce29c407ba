"""Finding the model files: a local folder, or a Hugging Face repo downloaded into its cache.

A model folder holds the language model, the Mimi codec, the text tokenizer and the voice
presets (`voices/`, unpacked once from `voices.tgz`). The official repo is gated: the
errors below tell the user exactly which step (licence, token, network) is missing.
Folders (and repos) of the MLX 4-bit/8-bit conversion are recognised by their
`temporal.safetensors` and used as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)

from personaplex.errors import GatedModelError, ModelUnavailableError
from personaplex.text.tokenizer import TEXT_TOKENIZER_FILENAME

DEFAULT_REPO = "nvidia/personaplex-7b-v1"
LM_FILENAME = "model.safetensors"
MIMI_FILENAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
VOICES_ARCHIVE_FILENAME = "voices.tgz"
VOICES_DIRNAME = "voices"
REQUIRED_FILES = (LM_FILENAME, MIMI_FILENAME, TEXT_TOKENIZER_FILENAME)
# The MLX conversion: the LM split in three quantized files, Mimi copied as mimi.safetensors,
# voices as voices/NAME.safetensors, and a config.json of its own that lists the voices.
MLX_LM_FILES = ("temporal.safetensors", "depformer.safetensors", "embeddings.safetensors")
MLX_MIMI_FILENAME = "mimi.safetensors"
MLX_REQUIRED_FILES = (*MLX_LM_FILES, MLX_MIMI_FILENAME, TEXT_TOKENIZER_FILENAME)
# What we download: the weights and the voices, not dist.tgz (the reference's web UI).
# Small files first, so a licence or network problem shows before the 16.7 GB one.
DOWNLOADED_FILES = (TEXT_TOKENIZER_FILENAME, VOICES_ARCHIVE_FILENAME, MIMI_FILENAME, LM_FILENAME)
# huggingface_hub retries an unreachable hub 5 times with back-off (about 25 s per file):
# one quick connection attempt first tells us to use the cache alone.
HUB_PROBE_TIMEOUT_S = 3.0
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def resolve_model_folder(source: str | Path | None = None, *, progress: bool = True) -> Path:
    """A folder holding the model files, downloading them first if `source` is a repo id.

    `source` is a local folder (used as is), a Hugging Face repo id, or None for the
    official repo. The voices archive, if present, is unpacked once into `voices/`.
    """
    given_folder = local_folder(source)
    if given_folder is not None:
        _check_local_folder(given_folder)
        folder = given_folder
    else:
        folder = _download_repo(str(source or DEFAULT_REPO), progress=progress)
    _ensure_voices_unpacked(folder)
    return folder


def find_voices_dir(model_folder: str | Path) -> Path | None:
    """Where the voice presets of a model folder are, or None if it has none."""
    model_folder = Path(model_folder)
    for candidate in (model_folder / VOICES_DIRNAME, _fallback_voices_dir(model_folder)):
        if candidate.is_dir():
            return candidate
    return None


def local_folder(source: str | Path | None) -> Path | None:
    """The local folder `source` names, or None when it is a repo id (or the default)."""
    if source is None:
        return None
    path = Path(source).expanduser()
    if isinstance(source, Path) or path.exists() or _looks_like_path(str(source)):
        return path
    return None


def _looks_like_path(source: str) -> bool:
    # A repo id is "owner/name"; these can only be meant as paths.
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1


def is_mlx_folder(folder: str | Path) -> bool:
    """True for a folder of the MLX conversion (`temporal.safetensors` instead of `model.safetensors`)."""
    return (Path(folder) / MLX_LM_FILES[0]).is_file()


def _check_local_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelUnavailableError(
            f"model folder {folder} does not exist: pass a folder holding "
            f"{', '.join(REQUIRED_FILES)}, or a Hugging Face repo id such as {DEFAULT_REPO}"
        )
    required = MLX_REQUIRED_FILES if is_mlx_folder(folder) else REQUIRED_FILES
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise ModelUnavailableError(
            f"model folder {folder} lacks {', '.join(missing)}: download them from "
            f"https://huggingface.co/{DEFAULT_REPO} into it"
        )


def _download_repo(repo_id: str, *, progress: bool) -> Path:
    offline_reason = hub_offline_reason()
    with _progress_bars(progress):
        config = _download_file(repo_id, "config.json", offline_reason)
        paths = [_download_file(repo_id, filename, offline_reason) for filename in _repo_files(config)]
    # hf_hub_download puts every file of one revision in the same snapshot folder.
    return paths[0].parent


def hub_offline_reason() -> str | None:
    """Why the hub will not be asked (files then come from the cache only), or None."""
    if hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE_VALUES:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlsplit(hub_constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{endpoint.hostname} cannot be reached ({err.strerror or err})"
    return None


def _repo_files(config_path: Path) -> list[str]:
    """The files to fetch, by the repo's layout: official, or the MLX conversion (whose
    config.json has a `quantization` section and lists its voices)."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and "quantization" in config and "temporal" in config:
        voices = [f"{VOICES_DIRNAME}/{name}.safetensors" for name in config.get("voices", [])]
        return [TEXT_TOKENIZER_FILENAME, *voices, MLX_MIMI_FILENAME, *MLX_LM_FILES]
    return list(DOWNLOADED_FILES)


def _download_file(repo_id: str, filename: str, offline_reason: str | None) -> Path:
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline_reason is not None))
    except GatedRepoError as err:
        raise GatedModelError(_gated_message(repo_id)) from err
    except RepositoryNotFoundError as err:
        raise ModelUnavailableError(
            f"{repo_id!r} is neither a local folder nor a Hugging Face repo you can see: check "
            f"the name (the official one is {DEFAULT_REPO}); for a private repo set HF_TOKEN"
        ) from err
    # LocalEntryNotFoundError is what hf_hub_download raises when the file is neither
    # reachable nor cached; it must be caught before its base EntryNotFoundError.
    except LocalEntryNotFoundError as err:
        raise ModelUnavailableError(_not_cached_message(repo_id, filename, offline_reason)) from err
    except EntryNotFoundError as err:
        raise ModelUnavailableError(
            f"repo {repo_id} has no file {filename}, so it is not a PersonaPlex checkpoint: "
            f"use {DEFAULT_REPO} or a local folder"
        ) from err
    except HfHubHTTPError as err:
        if _status_code(err) in (401, 403):
            raise GatedModelError(_gated_message(repo_id)) from err
        raise ModelUnavailableError(
            f"downloading {filename} from {repo_id} failed ({err}): try again later, "
            "or pass --model DIR with the files"
        ) from err
    except OSError as err:
        raise ModelUnavailableError(
            f"downloading {filename} from {repo_id} failed ({err}): check the network "
            "connection and free disk space, or pass --model DIR with the files"
        ) from err


def _not_cached_message(repo_id: str, filename: str, offline_reason: str | None) -> str:
    reason = offline_reason or "the Hugging Face hub cannot be reached"
    remedy = "unset HF_HUB_OFFLINE" if offline_reason == "HF_HUB_OFFLINE is set" else "connect to the network"
    return (
        f"{reason}, and {filename} of {repo_id} is not in the Hugging Face cache: {remedy} to "
        f"download it once, or pass --model DIR with a folder holding {', '.join(REQUIRED_FILES)} "
        f"and {VOICES_DIRNAME}/ (or {VOICES_ARCHIVE_FILENAME})"
    )


def _gated_message(repo_id: str) -> str:
    return (
        f"{repo_id} is gated and this machine has no access: 1) accept its licence at "
        f"https://huggingface.co/{repo_id} while logged in; 2) give this machine a read token "
        "(https://huggingface.co/settings/tokens) with `export HF_TOKEN=<token>` or `hf auth login`; "
        "3) run the command again. With the files already on disk: --model DIR"
    )


def _status_code(err: HfHubHTTPError) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn huggingface_hub's download bars off for the block if asked; restore after."""
    were_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if were_disabled:
            disable_progress_bars()
        else:
            enable_progress_bars()


def _ensure_voices_unpacked(folder: Path) -> None:
    archive = folder / VOICES_ARCHIVE_FILENAME
    if find_voices_dir(folder) is not None or not archive.is_file():
        return
    try:
        _unpack_voices(archive, folder / VOICES_DIRNAME)
    except PermissionError:
        # The Hugging Face cache can be shared and read-only: unpack into our own cache.
        _unpack_voices(archive, _fallback_voices_dir(folder))


def _fallback_voices_dir(model_folder: Path) -> Path:
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "personaplex"
    folder_key = hashlib.sha256(str(model_folder.resolve()).encode()).hexdigest()[:16]
    return cache_root / VOICES_DIRNAME / folder_key


def _unpack_voices(archive: Path, destination: Path) -> None:
    """Extract `archive` into `destination`, which appears only once complete.

    Files go to a staging folder renamed at the end, so the existence of `destination`
    is the marker that the archive was unpacked: later calls never unpack it again.
    """
    staging = destination.parent / f".{destination.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _extract_safely(archive, staging)
        # The official archive holds voices/NAME.pt; a flat archive is accepted too.
        unpacked = staging / VOICES_DIRNAME
        (unpacked if unpacked.is_dir() else staging).rename(destination)
    except OSError:
        if not destination.is_dir():  # unless another process finished it first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_safely(archive: Path, root: Path) -> None:
    """Extract regular files and folders only, refusing paths that leave `root`."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member)
            for member in members:
                target = root.joinpath(*PurePosixPath(member.name).parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
    except tarfile.TarError as err:
        raise ModelUnavailableError(
            f"{archive} is not a readable archive ({err}): delete it and download it again"
        ) from err


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
        raise ModelUnavailableError(
            f"{archive} contains an unsafe entry {member.name!r} (absolute path, '..' or a "
            "link): refusing to unpack it; delete the archive and download it again"
        )
