"""The README's Python blocks run verbatim (in a scratch directory, since they write files), and its two
commands are the ones CI runs."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, "the README lost its Quick start / Quantizer API blocks"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path):
    # a fresh interpreter per block: a block must not depend on names another block defined
    r = subprocess.run([sys.executable, "-c", BLOCKS[i]], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONWARNINGS": "error::FutureWarning"})
    assert r.returncode == 0, f"README python block {i} failed:\n{BLOCKS[i]}\n--- stderr ---\n{r.stderr[-3000:]}"


def test_setup_command_pins_the_tested_versions():
    text = README.read_text()
    setup = text.split("<!-- setup-command -->", 1)[1].strip().splitlines()[0]
    assert setup.count("-c constraints.txt") == 2, setup
    pins = (README.parent / "constraints.txt").read_text()
    for name in ("torch", "transformers", "triton", "accelerate", "gguf", "safetensors"):
        assert re.search(rf"^{name}==\S+$", pins, flags=re.M), f"constraints.txt does not pin {name}"
