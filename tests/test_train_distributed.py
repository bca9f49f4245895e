"""The trainer on several processes: ``launchers/local.py --nproc 2`` against one process, and resumes
across a change of layout, on the real corpus (tiny model, dropout 0, fp32, gloo).

One uninterrupted single-process run (in this process) is the reference. Two spawns serve the
checks: tensor parallelism (tp=2) over the whole run, and FSDP (dp_shard=2) continuing the
reference's step-3 checkpoint; a one-process run continues the tp=2 run's step-3 checkpoint.

Tolerances: logged losses, grad norms and validation NELBO (128 + 32 + sqrt(50258)) * 2^-24
relative (the sharded sums round differently, see ``REL``); weights after six AdamW steps 3e-4
absolute (Adam turns rounding-level gradient differences on near-zero entries into steps of up to
lr = 1e-3; a wrong gradient moves every entry by about that much each step); the data position
exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lomdm_dist.config import load_config
from lomdm_dist import checkpoint as ckpt_lib
from lomdm_dist.train.trainer import Trainer
from dist_utils import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.dist

# A loss sums 4 x 32 = 128 float32 token terms, each from length-32 dot products and a log-sum-exp over
# the 50,258 GPT-2 logits (split over tensor-parallel ranks): worst case 128 + 32 roundings, typical
# sqrt(50258) for the vocabulary sum, all in units of 2^-24. A gradient norm rounds like the gradients
# (the same sums) plus torch's cascaded sum of 3.4M squares (about log2(3.4M) = 22 roundings).
REL = (128 + 32 + 50_258 ** 0.5) * 2**-24
ABS_WEIGHTS = 3e-4
STEPS = 6          # tiny_overrides: six steps, evaluation and checkpoint every three, global batch 4
RESUME_AT = 3


def launch(nproc: int, overrides: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launchers/local.py", "--nproc", str(nproc), "configs/smoke.yaml",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_values(run_dir: Path) -> dict[int, tuple[float, float]]:
    """(nelbo, grad_norm) per logged step. Not the logged ``loss``: for LoMDM it is the RLOO surrogate,
    whose score-function term is a difference of importance-weighted terms much larger than the
    result, so its rounding is relative to those terms, not to the value; the gradient norm carries
    the comparison of the surrogate."""
    return {m["step"]: (m["nelbo"], m["grad_norm"]) for m in metrics(run_dir) if "loss" in m}


def eval_values(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["val_nelbo"] for m in metrics(run_dir) if "val_nelbo" in m}


def resume_from(checkpoint: Path, run_dir: Path) -> None:
    """A fresh run directory holding only ``checkpoint`` (what a resumed run starts from)."""
    shutil.copytree(checkpoint, ckpt_lib.checkpoint_root(run_dir) / checkpoint.name)


def data_positions(ckpt: Path) -> list[int]:
    return [torch.load(f, weights_only=True)["global_samples"] for f in sorted((ckpt / "data").glob("dp*.pt"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("train_distributed")
    cache = str(tmp_path_factory.getbasetemp() / "dist_corpus_cache")
    out = {name: base / name for name in ("single", "tp2", "tp2_then_single", "single_then_fsdp2")}
    Trainer(load_config(ROOT / "configs/smoke.yaml", tiny_overrides(out["single"], cache))).run()

    tp2 = launch(2, tiny_overrides(out["tp2"], cache, **{"parallel.tp": 2}))
    assert tp2.returncode == 0, tp2.stderr[-4000:]

    resume_from(out["tp2"] / "checkpoints" / f"step-{RESUME_AT:08d}", out["tp2_then_single"])
    Trainer(load_config(ROOT / "configs/smoke.yaml", tiny_overrides(out["tp2_then_single"], cache))).run()

    resume_from(out["single"] / "checkpoints" / f"step-{RESUME_AT:08d}", out["single_then_fsdp2"])
    fsdp = launch(2, tiny_overrides(out["single_then_fsdp2"], cache, **{"parallel.dp_shard": 2}))
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    return out


def assert_same_training(run_dir: Path, reference: Path, steps: range) -> None:
    got, want = train_values(run_dir), train_values(reference)
    assert sorted(got) == list(steps), f"{run_dir.name}: logged steps {sorted(got)}"
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=REL), (run_dir.name, step)
    got_eval, want_eval = eval_values(run_dir), eval_values(reference)
    assert got_eval and all(got_eval[s] == pytest.approx(want_eval[s], rel=REL) for s in got_eval), run_dir.name


def assert_same_final_state(run_dir: Path, reference: Path) -> None:
    got, want = ckpt_lib.load_checkpoint(run_dir), ckpt_lib.load_checkpoint(reference)
    assert got["meta"]["step"] == want["meta"]["step"] == STEPS
    for part in ("model", "ema"):
        assert got[part].keys() == want[part].keys()
        for name, value in want[part].items():
            torch.testing.assert_close(got[part][name], value, rtol=0, atol=ABS_WEIGHTS,
                                       msg=f"{run_dir.name}: {part} {name}")
    want_position = data_positions(want["path"])
    assert want_position == [STEPS * 4]
    assert set(data_positions(got["path"])) == set(want_position), run_dir.name


def test_tensor_parallel_run_logs_the_single_process_numbers(runs):
    assert_same_training(runs["tp2"], runs["single"], range(1, STEPS + 1))
    assert_same_final_state(runs["tp2"], runs["single"])
    assert ckpt_lib.read_meta(ckpt_lib.latest_checkpoint(runs["tp2"]))["layout"]["tp"] == 2
    # samples come from the weights gathered on rank 0
    record = json.loads((runs["tp2"] / "samples" / f"step-{STEPS:08d}.jsonl").read_text().splitlines()[0])
    assert len(record["tokens"]) == 32 and record["text"]


def test_resume_on_one_process_from_a_tensor_parallel_checkpoint(runs):
    assert_same_training(runs["tp2_then_single"], runs["single"], range(RESUME_AT + 1, STEPS + 1))
    assert_same_final_state(runs["tp2_then_single"], runs["single"])


def test_resume_with_fsdp_from_a_single_process_checkpoint(runs):
    run = runs["single_then_fsdp2"]
    assert_same_training(run, runs["single"], range(RESUME_AT + 1, STEPS + 1))
    assert_same_final_state(run, runs["single"])
    assert len(data_positions(ckpt_lib.latest_checkpoint(run))) == 2    # one data-loader state per dp slice


def test_inference_model_loads_a_sharded_checkpoint_in_one_process(runs):
    from lomdm_dist.checkpoint.inference import load_inference_model

    _, model, _ = load_inference_model(str(runs["tp2"]), use_ema=True)
    ema = ckpt_lib.load_checkpoint(runs["single"])["ema"]
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), ema[name], rtol=0, atol=ABS_WEIGHTS, msg=name)
