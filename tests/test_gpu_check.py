"""The GPU measurement scripts parse and answer --help without a GPU.

Their real run needs a CUDA device (``bash tools/gpu_check.sh``); ``--cpu-dry-run`` exercises every
step on CPU but takes minutes, so CI only checks what can break silently between GPU sessions:
the shell syntax, the option parsing and that the help lists every step.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["tools/gpu_check.sh", "tools/gpu_carry.sh"]
STEPS = ["deps", "a-tests", "b-smoke", "c-kernels", "d-compile", "e-sample", "f-eager", "f-compile", "g-profile",
         "h-plan"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def bash(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_valid_bash(script):
    result = bash("-n", script)
    assert result.returncode == 0, result.stderr


def test_help_lists_every_step_and_option():
    result = bash("tools/gpu_check.sh", "--help")
    assert result.returncode == 0, result.stderr
    for word in [*STEPS, "--cpu-dry-run", "--budget-s", "--only", "--out", "gpu_carry.sh"]:
        assert word in result.stdout, word


def test_every_documented_step_is_run():
    """The help text and the run section name the same steps (a renamed step would drift apart)."""
    text = (ROOT / "tools/gpu_check.sh").read_text()
    for step in STEPS:
        assert f"run_step {step} " in text or f"record {step} " in text, step


def test_carry_help():
    result = bash("tools/gpu_carry.sh", "--help")
    assert result.returncode == 0, result.stderr
    assert ".whl" in result.stdout and "data/cache" in result.stdout


@pytest.mark.parametrize("args", [["--no-such-flag"], ["--budget-s", "soon"]])
def test_bad_arguments_exit_2(args):
    result = bash("tools/gpu_check.sh", *args)
    assert result.returncode == 2
    assert "gpu_check.sh:" in result.stderr
