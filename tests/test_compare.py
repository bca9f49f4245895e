"""tools/compare.py: argument errors, the equal-work batch arithmetic, the wall-time reconstruction,
the rendering of hand-made runs, and (slow) two real runs compared end to end.

Expected values are computed here by hand or read back independently from the files the trainer
wrote, never taken from compare.py's own helpers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers_tools import load_tool

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs/smoke.yaml")


compare = load_tool("compare")


def run_compare(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/compare.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("runs, protocol, message", [
    (["lomdm"], "paper", "must look like NAME:"),
    (["a:", "a:diffusion.scheduler=mdlm"], "paper", "duplicate run name 'a'"),
    (["a:"], "linear", "invalid choice: 'linear'"),
    (["a:diffusion.scheduler"], "paper", "must look like key.sub=value"),
    (["a:data.batch_size=16"], "equal-work", "data.batch_size, which the protocol decides"),
    (["a:diffusion.scheduler=nope"], "paper", "run 'a': config error"),
])
def test_bad_arguments_give_one_line_and_status_2(tmp_path, runs, protocol, message):
    result = run_compare(SMOKE, "--runs", *runs, "--protocol", protocol, "--out", str(tmp_path), timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()          # nothing was trained


def test_run_specs_parse_names_and_overrides():
    specs = compare.parse_run_specs(["lomdm:", "mdlm:diffusion.scheduler=mdlm,optim.betas=[0.9, 0.98]"])
    assert [(s.name, s.overrides) for s in specs] == [
        ("lomdm", []), ("mdlm", ["diffusion.scheduler=mdlm", "optim.betas=[0.9, 0.98]"])]
    for bad in (["a/b:x=1"], [":x=1"], ["a:run.dir=elsewhere"]):
        with pytest.raises(compare.UsageError):
            compare.parse_run_specs(bad)


# ------------------------------------------------------------------------------------------ protocols
def test_equal_work_batches_equalise_masked_rows():
    assert compare.equal_work_batches(4, {"lomdm": 2, "mdlm": 1, "poly": 1}) == {"lomdm": 4, "mdlm": 8, "poly": 8}
    assert compare.equal_work_batches(4, {"a": 2, "b": 3}) == {"a": 6, "b": 4}     # 12 masked rows each
    assert compare.equal_work_batches(5, {"a": 1, "b": 1}) == {"a": 5, "b": 5}
    with pytest.raises(compare.UsageError, match="not a multiple of the 2 masks per row"):
        compare.equal_work_batches(3, {"a": 2, "b": 3})                            # 9 rows at 2 masks each


@pytest.mark.parametrize("protocol, expected", [("equal-work", {"lomdm": 8, "mdlm": 16, "k3": 8}),
                                                ("paper", {"lomdm": 8, "mdlm": 8, "k3": 8})])
def test_plan_resolves_schedulers_and_batches(tmp_path, protocol, expected):
    specs = compare.parse_run_specs(["lomdm:", "mdlm:diffusion.scheduler=mdlm",
                                     "k3:diffusion.scheduler=poly,diffusion.masks_per_row=2"])
    runs = compare.plan_runs(SMOKE, specs, protocol, ["train.max_steps=7"], tmp_path)
    assert {r.name: r.batch_size for r in runs} == expected                         # smoke.yaml: batch 8
    assert {r.name: r.masks_per_row for r in runs} == {"lomdm": 2, "mdlm": 1, "k3": 2}
    assert all(r.max_steps == 7 for r in runs)
    mdlm = runs[1]
    assert mdlm.argv[1:4] == ["-m", "lomdm_dist.train", SMOKE]
    assert mdlm.argv[-1] == f"run.dir={tmp_path / 'runs' / 'mdlm'}"
    assert ("data.batch_size=16" in mdlm.argv) == (protocol == "equal-work")
    assert mdlm.argv.index("train.max_steps=7") < mdlm.argv.index("diffusion.scheduler=mdlm")


def test_a_failing_run_stops_the_comparison_naming_run_and_log(tmp_path):
    """The trainer is replaced by one-line programs: the failure handling, not training, is under test."""
    def planned(name, code):
        run = compare.PlannedRun(name=name, overrides=[], scheduler="mdlm", masks_per_row=1, batch_size=1,
                                 max_steps=1, seq_len=1, warmup_steps=0, run_dir=tmp_path / "runs" / name)
        run.argv = [sys.executable, "-c", code]
        return run

    marker = tmp_path / "second-run-started"
    runs = [planned("broken", "import sys; print('boom on stdout'); sys.exit(3)"),
            planned("next", f"open({str(marker)!r}, 'w')")]
    with pytest.raises(compare.RunFailed) as err:
        compare.train_runs(runs)
    message = str(err.value)
    assert "run 'broken'" in message and "exit status 3" in message
    assert str(tmp_path / "runs" / "broken.log") in message
    assert "boom on stdout" in (tmp_path / "runs" / "broken.log").read_text()
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ metrics
def write_metrics(path: Path, records: list[dict], cut_line: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + ('{"step": 9, "loss": 1.0, "tok' if cut_line else ""))


def test_wall_time_is_rebuilt_from_throughput(tmp_path):
    # batch 4 x seq_len 64 = 256 tokens a step. Lines at steps 2, 3, 6 (eval at 3 between them):
    # 2 steps at 128 tok/s = 4 s; 1 step at 256 tok/s = 1 s; 3 steps at 384 tok/s = 2 s. Total 7 s.
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, [
        {"step": 2, "loss": 5.0, "nelbo": 5.0, "tokens_per_sec": 128.0},
        {"step": 3, "loss": 4.0, "nelbo": 4.0, "tokens_per_sec": 256.0},
        {"step": 3, "val_nelbo": 4.5, "val_ppl": 90.0},
        {"step": 6, "loss": 3.0, "nelbo": 3.0, "tokens_per_sec": 384.0},
    ], cut_line=True)
    train, evals = compare.read_metrics(path)
    assert [r["step"] for r in train] == [2, 3, 6] and [r["step"] for r in evals] == [3]
    points = compare.train_wall_time(train, batch_size=4, seq_len=64)
    assert [s for s, _ in points] == [2, 3, 6]
    assert [t for _, t in points] == pytest.approx([4.0, 5.0, 7.0])
    assert compare.time_at_step(points, 4) == pytest.approx(5.0 + 2.0 / 3.0)      # a third of the last interval
    assert compare.time_at_step(points, 1) == pytest.approx(2.0)


def test_render_writes_table_json_plots_and_tensorboard(tmp_path):
    """Two hand-made runs, one LoMDM with standard errors, one MDLM from an older trainer without."""
    out = tmp_path / "cmp"
    lomdm = [{"step": s, "loss": 1.0, "nelbo": 6.0 - s / 10, "l_main": 5.0, "l_velocity": 0.01,
              "tokens_per_sec": 512.0, "k_phi_std": [0.0, 0.02, 0.05, 0.01, 0.0, 0.004][s - 1]}
             for s in range(1, 7)]
    lomdm += [{"step": 3, "val_nelbo": 5.5, "val_nelbo_se": 0.1, "val_l_main": 5.4, "val_l_velocity": 0.1},
              {"step": 6, "val_nelbo": 5.25, "val_nelbo_se": 0.05, "val_l_main": 5.2, "val_l_velocity": 0.05}]
    mdlm = [{"step": s, "loss": 6.0, "nelbo": 6.0, "l_main": 6.0, "l_velocity": 0.0, "tokens_per_sec": t}
            for s, t in ((3, 1000.0), (6, 3000.0))]
    mdlm += [{"step": 6, "val_nelbo": 5.75, "val_l_main": 5.75, "val_l_velocity": 0.0}]
    write_metrics(out / "runs/lomdm/metrics.jsonl", lomdm)
    write_metrics(out / "runs/mdlm/metrics.jsonl", mdlm)
    specs = compare.parse_run_specs(["lomdm:", "mdlm:diffusion.scheduler=mdlm"])
    common = ["data.batch_size=4", "optim.warmup_steps=2", "train.max_steps=6"]
    runs = compare.plan_runs(SMOKE, specs, "equal-work", common, out)
    compare.render(runs, out, config=SMOKE, protocol="equal-work", common=common)

    summary = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    # lomdm: 4 x 64 tokens a step, 6 steps at 512 tok/s = 3 s; mdlm: 8 x 64, 3 steps at 1000 + 3 at 3000
    assert summary["lomdm"]["train_wall_time_s"] == pytest.approx(3.0)
    assert summary["mdlm"]["train_wall_time_s"] == pytest.approx(1536 / 1000 + 1536 / 3000)
    assert summary["mdlm"]["batch_size"] == 8 and summary["lomdm"]["batch_size"] == 4
    assert summary["lomdm"]["final_val_nelbo"] == 5.25 and summary["lomdm"]["final_val_nelbo_se"] == 0.05
    assert summary["mdlm"]["final_val_nelbo_se"] is None and summary["mdlm"]["k_phi_std_final"] is None
    assert summary["lomdm"]["k_phi_std_final"] == 0.004
    assert summary["lomdm"]["k_phi_std_min_after_warmup"] == 0.0                   # steps 3..6, not step 1
    assert summary["mdlm"]["median_tokens_per_sec"] == pytest.approx(2000.0)
    assert summary["lomdm"]["curves"]["eval"]["val_nelbo"] == [5.5, 5.25]

    table = (out / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in table.splitlines() if line.startswith("| lomdm") or line.startswith("| mdlm")}
    assert rows["lomdm"][5] == "5.2500 ± 0.0500" and rows["mdlm"][5] == "5.7500 ± -"
    assert rows["mdlm"][3] == "8" and rows["mdlm"][10] == "-"
    assert "train wall time (evaluation excluded)" in table
    check_plots(out, ["val_nelbo_vs_step.png", "val_nelbo_vs_time.png", "k_phi_spread_vs_step.png"])
    check_tensorboard(out / "tensorboard", {"lomdm": [5.5, 5.25], "mdlm": [5.75]})

    # re-rendering replaces, it does not append: the TensorBoard curves keep their points
    compare.render(runs, out, config=SMOKE, protocol="equal-work", common=common)
    check_tensorboard(out / "tensorboard", {"lomdm": [5.5, 5.25], "mdlm": [5.75]})


def check_plots(out: Path, names: list[str]) -> None:
    import matplotlib.image

    for name in names:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] >= 100 and image.shape[1] >= 100, name
        flat = image.reshape(-1, image.shape[-1])
        assert (flat != flat[0]).any(axis=1).sum() > 0.01 * len(flat), f"{name} is (almost) one colour"


def check_tensorboard(root: Path, val_nelbo: dict[str, list[float]]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, expected in val_nelbo.items():
        events = EventAccumulator(str(root / name))
        events.Reload()
        assert [e.value for e in events.Scalars("compare/val_nelbo")] == pytest.approx(expected)
        assert ("compare/k_phi_std" in events.Tags()["scalars"]) == (name.startswith("lomdm"))


# ------------------------------------------------------------------------------------------ end to end
TINY = ["train.max_steps=4", "train.eval_every=2", "train.log_every=1", "train.ckpt_every=4",
        "eval.max_batches=1", "data.eval_batch_size=8", "sample.every_eval=false", "data.batch_size=4",
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.cond_dim=32", "optim.warmup_steps=1",
        "train.progress=false"]


@pytest.mark.slow
def test_compare_trains_two_runs_under_equal_work(tmp_path):
    out = tmp_path / "cmp"
    result = run_compare(SMOKE, "--runs", "lomdm:", "mdlm:diffusion.scheduler=mdlm", "--protocol", "equal-work",
                         "--out", str(out), *TINY, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("python -m lomdm_dist.train") >= 2          # each run's command is printed

    saved = {name: yaml.safe_load((out / "runs" / name / "config.yaml").read_text()) for name in ("lomdm", "mdlm")}
    assert saved["lomdm"]["data"]["batch_size"] == 4
    assert saved["mdlm"]["data"]["batch_size"] == 2 * saved["lomdm"]["data"]["batch_size"]
    assert saved["mdlm"]["diffusion"]["scheduler"] == "mdlm"
    assert (out / "runs/lomdm.log").is_file() and (out / "runs/mdlm.log").is_file()

    table = (out / "summary.md").read_text()
    assert any(line.startswith("| lomdm | lomdm |") for line in table.splitlines())
    assert any(line.startswith("| mdlm | mdlm |") for line in table.splitlines())

    summary = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    for name in ("lomdm", "mdlm"):
        evals = [m for m in read_lines(out / "runs" / name / "metrics.jsonl") if "val_nelbo" in m]
        assert summary[name]["final_val_nelbo"] == evals[-1]["val_nelbo"]
        assert math.isfinite(summary[name]["train_wall_time_s"]) and summary[name]["train_wall_time_s"] > 0
        assert summary[name]["steps"] == 4
    assert summary["lomdm"]["k_phi_std_final"] is not None and summary["mdlm"]["k_phi_std_final"] is None
    check_plots(out, ["val_nelbo_vs_step.png", "val_nelbo_vs_time.png", "k_phi_spread_vs_step.png"])
    check_tensorboard(out / "tensorboard",
                      {name: [m["val_nelbo"] for m in read_lines(out / "runs" / name / "metrics.jsonl")
                              if "val_nelbo" in m] for name in ("lomdm", "mdlm")})
