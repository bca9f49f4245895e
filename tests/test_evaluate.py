"""``tools/evaluate.py`` and ``lomdm_dist.eval.evaluate``: the numbers against closed forms and
independent computations, the EMA switch, two processes against one, and the errors.

A model whose output layer is zero (as built) gives every token the log-probability -log V (V: the
vocabulary without the mask), so its NELBO estimate is log V times the estimate of the time
integral sum_i A_i (1 - alpha_i) = -sum_i alpha_i', whose expectation is closed-form:
(alpha_i(a) - alpha_i(1)) averaged over positions, divided by 1 - t_eps for the truncated sampler
(t ~ U[t_eps, 1], weight 1) with a = t_eps, and with a = 0 for importance sampling over (0, 1].
This is log V exactly for lomdm (importance), (1 - mdlm_eps) log V for mdlm, (1 - t_eps^c1) /
(1 - t_eps) log V for poly, and a block-dependent factor within t_eps of 1 for arm and block. A
single estimate is random (the masks are), so the test compares the mean over many rows and time
samples with that expectation within 5 of its standard errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from data_pipeline.shards import write_shard
from lomdm_dist.checkpoint.distributed import save_checkpoint
from lomdm_dist.config import Config, DiffusionConfig, ModelConfig, config_to_dict
from lomdm_dist.diffusion import randomness
from lomdm_dist.diffusion.objective import step_randomness
from lomdm_dist.diffusion.schedulers import build_scheduler
from lomdm_dist.eval.perplexity import validation_nelbo
from lomdm_dist.model import build_model
from helpers_tools import load_tool

V = 61                     # token ids; the model adds the mask token
SEQ_LEN = 16
BATCH = 32


def _tool():
    return load_tool("evaluate")


def _config(scheduler: str) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(n_layers=1, d_model=32, n_heads=2, cond_dim=16, dropout=0.0)
    cfg.diffusion = DiffusionConfig(scheduler=scheduler)
    cfg.data.seq_len = SEQ_LEN
    cfg.data.eval_batch_size = BATCH
    return cfg


def _manifest(root: Path, rows: int, seed: int = 0) -> Path:
    """A validation split of uniformly random tokens (written directly, not by the builder)."""
    root.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(seed).integers(0, V, size=(rows, SEQ_LEN)).astype(np.uint16)
    size = write_shard(root / "shard-000000.tar", tokens, 0)
    manifest = {"format": "lomdm-token-shards", "build_version": 1, "split": "val", "seq_len": SEQ_LEN,
                "packing": "wrap", "pad_id": None, "dtype": "uint16", "num_samples": rows,
                "num_tokens": rows * SEQ_LEN, "shards": [{"url": "shard-000000.tar", "samples": rows, "bytes": size}],
                "tokenizer": {"name": "toy", "fingerprint": "0" * 16, "vocab_size": V, "bos": 0, "eos": 0,
                              "pad": None}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


def _checkpoint(run_dir: Path, cfg: Config, raw: dict, ema: dict | None) -> Path:
    return save_checkpoint(run_dir, 5, model_state=raw, ema_state=ema, trainer_state={},
                           config_yaml=yaml.safe_dump(config_to_dict(cfg)), meta={"vocab_size": V + 1}, keep=1)


def _masked_fraction(cfg: DiffusionConfig, t: float, position: int) -> float:
    """1 - alpha_i(t) of each scheduler, written out from its definition (docs/method.md)."""
    if cfg.scheduler == "mdlm":
        return (1.0 - cfg.mdlm_eps) * t
    if cfg.scheduler in ("poly", "lomdm"):         # lomdm with zero heads: k = c1 everywhere
        return t ** cfg.c1
    size = 1 if cfg.scheduler == "arm" else cfg.block_size
    blocks = SEQ_LEN // size
    u = min(max(blocks * t - (blocks - (position // size + 1)), 0.0), 1.0)
    return (1.0 - cfg.window_eps) * u + cfg.window_eps * t


def _expected_factor(cfg: DiffusionConfig) -> float:
    """E[estimate] / log V: the mean over positions of (alpha(a) - alpha(1)) / |support|."""
    lo, scale = (0.0, 1.0) if cfg.scheduler == "lomdm" else (cfg.t_eps, 1.0 - cfg.t_eps)
    return float(np.mean([(_masked_fraction(cfg, 1.0, i) - _masked_fraction(cfg, lo, i)) / scale
                          for i in range(SEQ_LEN)]))


def _random_rows(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, V, size=(rows, SEQ_LEN)))


@pytest.mark.parametrize("scheduler", ["lomdm", "mdlm", "poly", "arm", "block"])
def test_zero_output_layer_gives_log_v_per_token_in_expectation(scheduler):
    cfg = _config(scheduler)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion, V + 1)      # output layer and head last layers start at zero
    # Each row's 8 times are independent draws over the whole interval; arm's estimate has a heavy
    # tail near t_eps (weight 1 / masked fraction), so it takes 1024 rows for its SE to fall well
    # below 4% of the value (512 give 3.3-4.2% over seeds); the others stay under 2% with 512.
    rows = 1024 if scheduler == "arm" else 512
    r = validation_nelbo(model, build_scheduler(cfg.diffusion), _random_rows(rows).split(256), cfg=cfg.diffusion,
                         seed=0, t_samples=8)
    expected = _expected_factor(cfg.diffusion) * math.log(V)
    assert r["val_tokens"] == rows * SEQ_LEN
    assert abs(r["val_nelbo"] - expected) <= 5 * r["val_nelbo_se"], (r, expected)
    assert r["val_nelbo_se"] < 0.04 * expected                # the check above has teeth
    assert r["val_l_velocity"] == 0.0                         # A_hat = A: zero psi head or fixed scheduler
    # Every token's loss is exactly v log V; the parts differ by float32 rounding of rows of 16 terms.
    assert r["val_l_main"] == pytest.approx(r["val_nelbo"], rel=4 * SEQ_LEN * 2**-24)


def _row_moments(cfg: DiffusionConfig, K: int) -> tuple[float, float]:
    """(variance, 4th central moment) of one row's mask-count estimate X = N / t averaged over the
    K draws of a row, N ~ Binomial(L, (1 - eps) t). E[X | t] = L (1 - eps) whatever t, so only the
    binomial noise counts. The K draws of a row are independent with t ~ U[t_eps, 1] each (the
    strata are shifted by an independent uniform amount from draw to draw), so with v and m4 the
    moments of one draw (numerical averages over t of the binomial moments divided by t^2 and t^4)
    the mean of K has variance v / K and 4th central moment (m4 + 3 (K - 1) v^2) / K^3."""
    t = np.linspace(cfg.t_eps, 1.0, 400_001)
    p = (1.0 - cfg.mdlm_eps) * t
    v = float(np.mean(SEQ_LEN * p * (1 - p) / t ** 2))
    m4 = float(np.mean(SEQ_LEN * p * (1 - p) * (1 + 3 * (SEQ_LEN - 2) * p * (1 - p)) / t ** 4))
    return v / K, (m4 + 3 * (K - 1) * v ** 2) / K ** 3


def test_standard_error_shrinks_as_one_over_sqrt_k():
    """mdlm with zero logits: the per-token SE with K time samples is sd_K / (L sqrt(R)) log V with
    sd_K^2 = E_t[Var(N/t | t)] / K. A sample sd over R rows is off by about sqrt((kurtosis - 1) / (4R))
    relative; both SEs and their ratio (sqrt(8)) are checked within 4 of those errors."""
    cfg = _config("mdlm")
    cfg.diffusion = DiffusionConfig(scheduler="mdlm", t_eps=0.1)   # keeps the 1/t tail (kurtosis) moderate
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion, V + 1)
    rows = 512
    se, rel_err = {}, {}
    for K in (1, 8):
        out = validation_nelbo(model, build_scheduler(cfg.diffusion), _random_rows(rows).split(128),
                               cfg=cfg.diffusion, seed=0, t_samples=K)
        var, m4 = _row_moments(cfg.diffusion, K)
        predicted = math.sqrt(var) * math.log(V) / (SEQ_LEN * math.sqrt(rows))
        rel_err[K] = math.sqrt((m4 / var ** 2 - 1) / (4 * rows))
        assert abs(out["val_nelbo_se"] / predicted - 1) <= 4 * rel_err[K], (K, out["val_nelbo_se"], predicted)
        se[K] = out["val_nelbo_se"]
    band = 4 * math.sqrt(rel_err[1] ** 2 + rel_err[8] ** 2)
    assert abs(se[1] / se[8] / math.sqrt(8) - 1) <= band, (se, band)


def test_time_draws_of_a_row_cover_the_interval_and_each_draw_is_stratified():
    """With ``t_samples`` K, draw k of a batch of n rows must put one time in each stratum
    [s/n, (s+1)/n) of [t_eps, 1], while one row's times over the draws k >= 1 are uniform on the
    whole interval (a fixed stratum per row would leave its K-draw average biased). Draw 0 keeps
    the trainer's stratum (global row mod n), and the masks stay keyed by the global row."""
    cfg = DiffusionConfig(scheduler="mdlm", time_sampling="truncated", t_eps=0.01)
    n, K, seed = 8, 200, 3
    seen = []

    def recording_loss(model, scheduler, x, spec, *, cfg, valid):
        times, uniforms = step_randomness(spec, cfg, seq_len=x.shape[1], num_masks=1, device=x.device)
        seen.append((spec.rows.clone(), times.t.clone(), uniforms[0].clone()))
        zero = torch.zeros((), dtype=torch.float64)
        return SimpleNamespace(row_nelbo=torch.zeros(x.shape[0], dtype=torch.float64), l_main=zero, l_velocity=zero)

    validation_nelbo(torch.nn.Identity(), build_scheduler(cfg), _random_rows(2 * n).split(n), cfg=cfg, seed=seed,
                     t_samples=K, loss_fn=recording_loss)
    assert len(seen) == 2 * K
    strata = {}
    for call, (rows, t, uniforms) in enumerate(seen):
        k = call % K
        u = (t - cfg.t_eps) / (1 - cfg.t_eps)
        stratum = torch.floor(u * n).long()
        assert sorted(stratum.tolist()) == list(range(n)), k         # one time per stratum in every draw
        if k == 0:
            assert torch.equal(stratum, rows % n)
        assert torch.equal(uniforms, randomness.uniform(seed, k, randomness.STREAM_EVAL_MASK, rows, SEQ_LEN))
        for row, s_row, t_row in zip(rows.tolist(), stratum.tolist(), t.tolist()):
            strata.setdefault(row, []).append((k, s_row, t_row))
    for row in (3, 12):
        draws = [(s_row, t_row) for k, s_row, t_row in strata[row] if k >= 1]
        # Every stratum visited: each is missed with probability (1 - 1/n)^(K-1) < 3e-12.
        assert {s_row for s_row, _ in draws} == set(range(n)), row
        # Uniform on [t_eps, 1]: a KS test at level 1e-3 (the chance a correct draw fails it).
        times = np.array([t_row for _, t_row in draws])
        assert stats.kstest(times, "uniform", args=(cfg.t_eps, 1 - cfg.t_eps)).pvalue > 1e-3, row


@pytest.fixture
def trained_run(tmp_path):
    """A checkpoint whose raw and EMA weights differ (both non-trivial), its config, both states."""
    cfg = _config("lomdm")
    torch.manual_seed(1)
    model = build_model(cfg.model, cfg.diffusion, V + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v + 0.3 * torch.randn_like(v) for k, v in raw.items()}
    _checkpoint(tmp_path / "run", cfg, raw, ema)
    return tmp_path / "run", cfg, raw, ema, _manifest(tmp_path / "val", rows=40)


def _direct(cfg: Config, state: dict, manifest: Path, t_samples: int) -> float:
    """The NELBO of a model built here from ``state``, through the evaluation loop alone."""
    from data_pipeline.reader import iter_eval_batches

    model = build_model(cfg.model, cfg.diffusion, V + 1)
    model.load_state_dict(state)
    return validation_nelbo(model, build_scheduler(cfg.diffusion), iter_eval_batches(str(manifest), BATCH),
                            cfg=cfg.diffusion, seed=0, t_samples=t_samples)["val_nelbo"]


# A per-token NELBO: float32 rows of 16 token terms (log-sum-exp over 61 logits, length-32 dot
# products), summed in float64; regrouping the rows into other batches changes the float32 parts.
REL_VAL = (BATCH + SEQ_LEN + V + 32) * 2**-24


def test_ema_and_raw_weights_give_their_own_numbers(trained_run, tmp_path):
    run_dir, cfg, raw, ema, manifest = trained_run
    tool = _tool()
    got = {}
    for flag in ("--ema", "--no-ema"):
        out = tmp_path / f"{flag}.json"
        assert tool.main(["--ckpt", str(run_dir), "--data", str(manifest), "--t-samples", "2", "--no-progress",
                          "--out", str(out), flag]) == 0
        got[flag] = json.loads(out.read_text())
    assert got["--ema"]["weights"] == "ema" and got["--no-ema"]["weights"] == "raw"
    nelbo = {flag: report["results"][0]["nelbo"] for flag, report in got.items()}
    assert nelbo["--ema"] != pytest.approx(nelbo["--no-ema"], rel=1e-3)
    assert nelbo["--ema"] == pytest.approx(_direct(cfg, ema, manifest, 2), rel=REL_VAL)
    assert nelbo["--no-ema"] == pytest.approx(_direct(cfg, raw, manifest, 2), rel=REL_VAL)


@pytest.mark.dist
def test_two_processes_equal_one(trained_run, tmp_path):
    run_dir, _, _, _, manifest = trained_run
    tool = _tool()
    outs = {}
    for nproc in ("1", "2"):
        outs[nproc] = tmp_path / f"n{nproc}.json"
        assert tool.main(["--ckpt", str(run_dir), "--data", str(manifest), "--nproc", nproc, "--batch-size", "8",
                          "--max-rows", "30", "--no-progress", "--out", str(outs[nproc])]) == 0
    one, two = (json.loads(outs[n].read_text()) for n in ("1", "2"))
    assert two["world_size"] == 2 and two["layout"]["dp_shard"] == 2
    a, b = one["results"][0], two["results"][0]
    assert a["rows"] == b["rows"] == 30 and a["tokens"] == b["tokens"] == 30 * SEQ_LEN
    for key in ("nelbo", "l_main", "l_velocity", "nelbo_se"):
        assert b[key] == pytest.approx(a[key], rel=REL_VAL, abs=1e-9), key


def test_bad_inputs_are_one_line_errors_naming_them(trained_run, tmp_path, capsys):
    run_dir, _, _, _, manifest = trained_run
    tool = _tool()

    def error(*argv) -> str:
        assert tool.main(list(argv) + ["--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return err

    assert str(tmp_path / "nope") in error("--ckpt", str(tmp_path / "nope"), "--data", str(manifest))
    assert str(tmp_path / "missing") in error("--ckpt", str(run_dir), "--data", str(tmp_path / "missing"))
    assert "ptbx" in error("--ckpt", str(run_dir), "--data", "ptbx")
    shard = next((run_dir / "checkpoints").glob("step-*/state/*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert shard.name in error("--ckpt", str(run_dir), "--data", str(manifest))

