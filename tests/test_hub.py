import io
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from personaplex import hub
from personaplex.errors import ModelUnavailableError
from personaplex.hub import (
    DEFAULT_REPO,
    MIMI_FILENAME,
    REQUIRED_FILES,
    VOICES_ARCHIVE_FILENAME,
    find_voices_dir,
    resolve_model_folder,
)


def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"voice") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_archive(path: Path, names=("voices/NATF0.pt", "voices/NATM0.pt")) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            add_file(tar, name)


def make_folder(path: Path, *, with_archive: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in REQUIRED_FILES:
        (path / name).write_bytes(b"weights")
    if with_archive:
        write_archive(path / VOICES_ARCHIVE_FILENAME)
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def reachable_hub(monkeypatch):
    """Downloads are faked here; the hub counts as reachable unless a test says otherwise."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: SimpleNamespace(close=lambda: None))


def fake_response(status: int) -> SimpleNamespace:
    return SimpleNamespace(status_code=status, headers={}, request=None)


def test_local_folder_is_used_and_voices_unpacked(tmp_path):
    folder = make_folder(tmp_path / "model")
    for source in (folder, str(folder)):
        assert resolve_model_folder(source) == folder
    assert sorted(p.name for p in (folder / "voices").iterdir()) == ["NATF0.pt", "NATM0.pt"]
    assert find_voices_dir(folder) == folder / "voices"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left


def test_local_folder_without_voices_is_fine(tmp_path):
    folder = make_folder(tmp_path / "model", with_archive=False)
    assert resolve_model_folder(folder) == folder
    assert find_voices_dir(folder) is None


def test_existing_voices_folder_is_kept(tmp_path):
    folder = make_folder(tmp_path / "model")
    (folder / "voices").mkdir()
    (folder / "voices" / "VARF0.pt").write_bytes(b"x")
    resolve_model_folder(folder)
    assert [p.name for p in (folder / "voices").iterdir()] == ["VARF0.pt"]


def test_missing_files_are_named(tmp_path):
    folder = make_folder(tmp_path / "model")
    (folder / MIMI_FILENAME).unlink()
    with pytest.raises(ModelUnavailableError, match=f"lacks {MIMI_FILENAME}"):
        resolve_model_folder(folder)
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        resolve_model_folder(tmp_path / "nowhere")
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        resolve_model_folder("./nowhere/at/all")


def test_unpacked_only_once(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "model")
    resolve_model_folder(folder)
    calls = []
    monkeypatch.setattr(hub, "_unpack_voices", lambda *args: calls.append(args))
    stamp = (folder / "voices" / "NATF0.pt").stat().st_mtime_ns
    resolve_model_folder(folder)
    assert calls == [] and (folder / "voices" / "NATF0.pt").stat().st_mtime_ns == stamp


def test_flat_archive_is_accepted(tmp_path):
    folder = make_folder(tmp_path / "model", with_archive=False)
    write_archive(folder / VOICES_ARCHIVE_FILENAME, names=("NATF1.pt",))
    resolve_model_folder(folder)
    assert (folder / "voices" / "NATF1.pt").is_file()


@pytest.mark.parametrize("bad_name", ["../evil.pt", "/tmp/evil.pt", "voices/../../evil.pt"])
def test_traversal_member_refused(tmp_path, bad_name):
    folder = make_folder(tmp_path / "model", with_archive=False)
    write_archive(folder / VOICES_ARCHIVE_FILENAME, names=("voices/NATF0.pt", bad_name))
    with pytest.raises(ModelUnavailableError, match="unsafe entry"):
        resolve_model_folder(folder)
    assert not (folder / "voices").exists() and not (tmp_path / "evil.pt").exists()


def test_symlink_member_refused(tmp_path):
    folder = make_folder(tmp_path / "model", with_archive=False)
    with tarfile.open(folder / VOICES_ARCHIVE_FILENAME, "w:gz") as tar:
        link = tarfile.TarInfo("voices/NATF0.pt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(ModelUnavailableError, match="unsafe entry"):
        resolve_model_folder(folder)


def test_corrupt_archive(tmp_path):
    folder = make_folder(tmp_path / "model", with_archive=False)
    (folder / VOICES_ARCHIVE_FILENAME).write_bytes(b"not a tarball")
    with pytest.raises(ModelUnavailableError, match="not a readable archive"):
        resolve_model_folder(folder)


def test_read_only_folder_unpacks_into_cache(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "snapshot")
    real_mkdir = Path.mkdir

    def refuse_inside_snapshot(self, *args, **kwargs):
        if self.parent == folder:
            raise PermissionError(13, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse_inside_snapshot)
    resolve_model_folder(folder)
    voices = find_voices_dir(folder)
    assert voices is not None and voices.is_relative_to(tmp_path / "cache" / "personaplex")
    assert (voices / "NATF0.pt").is_file() and not (folder / "voices").exists()


def fake_download_into(snapshot: Path):
    def download(repo_id: str, filename: str, **kwargs) -> str:
        make_folder(snapshot)
        return str(snapshot / filename)

    return download


def test_repo_download(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "snapshots" / "abc"
    requested = []
    download = fake_download_into(snapshot)
    def recording_download(repo_id: str, filename: str, **kwargs) -> str:
        requested.append((repo_id, filename))
        return download(repo_id, filename)

    monkeypatch.setattr(hub, "hf_hub_download", recording_download)
    assert resolve_model_folder(None, progress=False) == snapshot
    assert {name for _, name in requested} == {*REQUIRED_FILES, VOICES_ARCHIVE_FILENAME, "config.json"}
    assert {repo for repo, _ in requested} == {DEFAULT_REPO}
    assert (snapshot / "voices" / "NATM0.pt").is_file()
    assert resolve_model_folder("someone/other-repo") == snapshot
    assert requested[-1][0] == "someone/other-repo"


def raising(error: Exception):
    def download(repo_id: str, filename: str, **kwargs) -> str:
        raise error

    return download


@pytest.mark.parametrize(
    "error,message",
    [
        (LocalEntryNotFoundError("offline"), "config.json of .* is not in the Hugging Face cache"),
        (
            GatedRepoError("gated", response=fake_response(403)),
            "gated .*accept its licence at https://huggingface.co/nvidia/personaplex-7b-v1"
            ".*HF_TOKEN.*hf auth login",
        ),
        (HfHubHTTPError("401", response=fake_response(401)), "gated.*HF_TOKEN"),
        (
            RepositoryNotFoundError("nope", response=fake_response(404)),
            "neither a local folder nor a Hugging Face repo",
        ),
        (EntryNotFoundError("no file"), "not a PersonaPlex checkpoint"),
        (HfHubHTTPError("500", response=fake_response(500)), "failed.*try again later"),
        (ConnectionError("reset by peer"), "check the network"),
    ],
)
def test_download_failures_are_explained(monkeypatch, error, message):
    monkeypatch.setattr(hub, "hf_hub_download", raising(error))
    with pytest.raises(ModelUnavailableError, match=message):
        resolve_model_folder(DEFAULT_REPO)


def test_progress_flag_restores_bars(monkeypatch, tmp_path):
    from huggingface_hub.utils import are_progress_bars_disabled

    seen = []
    download = fake_download_into(tmp_path / "snap")
    def watching_download(repo_id: str, filename: str, **kwargs) -> str:
        seen.append(are_progress_bars_disabled())
        return download(repo_id, filename)

    monkeypatch.setattr(hub, "hf_hub_download", watching_download)
    before = are_progress_bars_disabled()
    resolve_model_folder(DEFAULT_REPO, progress=False)
    assert all(seen) and are_progress_bars_disabled() == before


def test_mlx_repo_download_fetches_its_own_layout(tmp_path, monkeypatch):
    import json

    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    (snapshot / "config.json").write_text(json.dumps({"temporal": {}, "quantization": {"bits": 4}, "voices": ["NATF0", "VARM1"]}))
    requested = []

    def download(repo_id: str, filename: str, **kwargs) -> str:
        requested.append(filename)
        path = snapshot / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(b"x")
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    assert resolve_model_folder("aufklarer/PersonaPlex-7B-MLX-4bit", progress=False) == snapshot
    assert set(requested) == {"config.json", "tokenizer_spm_32k_3.model", "voices/NATF0.safetensors", "voices/VARM1.safetensors",
                              "mimi.safetensors", "temporal.safetensors", "depformer.safetensors", "embeddings.safetensors"}
    assert hub.is_mlx_folder(snapshot)


@pytest.mark.parametrize("error, gated", [
    (GatedRepoError("gated", response=fake_response(403)), True),
    (HfHubHTTPError("401", response=fake_response(401)), True),
    (LocalEntryNotFoundError("offline"), False),
    (HfHubHTTPError("500", response=fake_response(500)), False),
])
def test_only_access_problems_are_gated_errors(monkeypatch, error, gated):
    from personaplex.errors import GatedModelError

    monkeypatch.setattr(hub, "hf_hub_download", raising(error))
    with pytest.raises(ModelUnavailableError) as info:
        resolve_model_folder(DEFAULT_REPO)
    assert isinstance(info.value, GatedModelError) == gated


def cache_only_download(snapshot: Path, calls: list):
    """hf_hub_download as it behaves offline: the cache answers, or LocalEntryNotFoundError."""
    def download(repo_id: str, filename: str, local_files_only: bool = False) -> str:
        calls.append((filename, local_files_only))
        if not snapshot.is_dir():
            raise LocalEntryNotFoundError("not cached")
        return str(snapshot / filename)

    return download


@pytest.mark.parametrize("cached", [True, False])
def test_hf_hub_offline_uses_the_cache_without_asking_the_hub(tmp_path, monkeypatch, cached):
    snapshot = tmp_path / "snap"
    if cached:
        make_folder(snapshot)
    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: pytest.fail("probed the hub"))
    monkeypatch.setattr(hub, "hf_hub_download", cache_only_download(snapshot, calls))
    if cached:
        assert resolve_model_folder(DEFAULT_REPO, progress=False) == snapshot
    else:
        with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE is set, and config.json .*unset HF_HUB_OFFLINE"):
            resolve_model_folder(DEFAULT_REPO, progress=False)
    assert calls and all(local_only for _, local_only in calls)


def test_unreachable_hub_fails_at_once_without_retries(tmp_path, monkeypatch):
    calls, probes = [], []

    def unreachable(address, timeout):
        probes.append((address, timeout))
        raise socket.gaierror(-2, "Name or service not known")

    import socket

    monkeypatch.setattr(hub.socket, "create_connection", unreachable)
    monkeypatch.setattr(hub, "hf_hub_download", cache_only_download(tmp_path / "nothing", calls))
    with pytest.raises(ModelUnavailableError, match="huggingface.co cannot be reached .*Name or service not known.*"
                       "connect to the network to download it once, or pass --model DIR"):
        resolve_model_folder(DEFAULT_REPO, progress=False)
    assert probes == [(("huggingface.co", 443), hub.HUB_PROBE_TIMEOUT_S)]  # one attempt, no retries
    assert calls == [("config.json", True)]  # the cache only: huggingface_hub would retry 5 times
