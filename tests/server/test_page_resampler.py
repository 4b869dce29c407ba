"""The page's stream resampler (static/ogg-opus.js), run with node: blocks of any size give
the samples of the whole stream, so block edges click no more than the rest."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import personaplex.server

STATIC = Path(personaplex.server.__file__).parent / "static"

SCRIPT = """
import { LinearResampler } from "%s";
const input = Float32Array.from({ length: 4801 }, (_, i) => Math.sin(i / 7));
const whole = new LinearResampler(48000, 24000).process(input);
const streamed = [];
const resampler = new LinearResampler(48000, 24000);
const sizes = [1, 7, 960, 333, 2, 1000];
for (let start = 0, k = 0; start < input.length; k++) {
  const size = sizes[k %% sizes.length];
  streamed.push(...resampler.process(input.subarray(start, start + size)));
  start += size;
}
console.log(JSON.stringify({ whole: Array.from(whole), streamed }));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node")
def test_page_resampler_is_independent_of_block_sizes(tmp_path):
    script = tmp_path / "resample.mjs"
    script.write_text(SCRIPT % (STATIC / "ogg-opus.js").as_uri())
    result = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True, check=True).stdout)
    assert len(result["whole"]) == len(result["streamed"]) == 2401
    assert result["streamed"] == pytest.approx(result["whole"], abs=1e-6)
