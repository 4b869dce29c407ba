"""GPU tests: run on a machine with CUDA (`pytest -m gpu tests/gpu`), skipped elsewhere.

Tests parametrized over `scale` (tests/gpu/common.py) also have a small CPU variant that
runs everywhere and is not marked `gpu`."""

import gc
import json
import os
from pathlib import Path

import pytest
import torch

from tests.gpu.common import RECORDS


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/gpu/" not in str(item.fspath).replace("\\", "/"):
            continue
        if getattr(item, "callspec", None) is not None and item.callspec.params.get("scale") == "cpu":
            continue
        item.add_marker(pytest.mark.gpu)
        if not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def release_gpu_memory():
    """Each test builds multi-GB models: hand their memory back before the next one."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pytest_sessionfinish(session, exitstatus):
    """Write what the tests measured where PERSONAPLEX_QUALITY_JSON says (bench/gpu_quality.py)."""
    path = os.environ.get("PERSONAPLEX_QUALITY_JSON")
    if not path or not RECORDS:
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"device": device, "torch": torch.__version__, "records": RECORDS}, indent=1))
