"""The ancestral sampler against closed forms: reverse-step probabilities, categorical draws,
unmasking order of fixed and learned schedulers, caching, and the command-line tool.

Most tests use a fake model whose outputs are known exactly: the features are a one-hot encoding
of the position, the logits a fixed table per position, the psi head a fixed priority per position.
Expected values are computed here from the closed-form alpha of each scheduler, never from the
sampler's own helpers.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lomdm_dist.config import DiffusionConfig, ModelConfig
from helpers_checkpoint import write_tiny_checkpoint
from lomdm_dist.diffusion import sampler as sampler_mod
from lomdm_dist.diffusion.sampler import sample
from lomdm_dist.diffusion.schedulers import build_scheduler
from helpers_tools import load_tool

TOOL = Path(__file__).resolve().parents[1] / "tools" / "sample.py"


# ----------------------------------------------------------------------------------------------
# A fake model with the LoMDM API and exactly known outputs.

class FakeBackbone(nn.Module):
    """h = one-hot(position); logits = h @ table; records every call and sigma."""

    def __init__(self, table: torch.Tensor, time_conditioning: bool = False, cond_dim: int = 3):
        super().__init__()
        self.register_buffer("table", table.float())
        self.seq_len, self.vocab_size = table.shape
        self.cond_dim = cond_dim
        self.time_conditioning = time_conditioning
        self.feature_calls = 0
        self.sigmas: list[torch.Tensor] = []

    def conditioning(self, batch_size, sigma=None):
        if self.time_conditioning:
            assert sigma is not None and sigma.shape == (batch_size,)
            self.sigmas.append(sigma.clone())
            return sigma.float()[:, None].expand(batch_size, self.cond_dim).clone()
        return torch.zeros(batch_size, self.cond_dim, device=self.table.device)

    def features(self, tokens, c):
        assert tokens.shape[1] == self.seq_len and c.shape == (tokens.shape[0], self.cond_dim)
        self.feature_calls += 1
        return torch.eye(self.seq_len, device=self.table.device).expand(tokens.shape[0], -1, -1).clone()

    def output_logits(self, h, c):
        assert h.shape[:-1] == c.shape[:-1]
        return h @ self.table


class FakePsi(nn.Module):
    """g = h @ priority: a fixed head output per position, whatever the state."""

    def __init__(self, priority: torch.Tensor):
        super().__init__()
        self.register_buffer("priority", priority.float())
        self.calls = 0

    def forward(self, h, c):
        self.calls += 1
        return h @ self.priority


class FakeModel(nn.Module):
    def __init__(self, table, priority=None, time_conditioning=False):
        super().__init__()
        self.backbone = FakeBackbone(table, time_conditioning)
        self.psi = FakePsi(priority) if priority is not None else None
        self.phi = None
        self.mask_token_id = table.shape[1] - 1


def uniform_table(seq_len: int, vocab: int) -> torch.Tensor:
    return torch.zeros(seq_len, vocab)


def alpha_mdlm(t: float, eps: float = 1e-3) -> float:
    return 1.0 - (1.0 - eps) * t


def alpha_poly(t: float, c: float) -> float:
    return 1.0 - t ** c


def alpha_block(t: float, block: int, n_blocks: int, eps: float) -> float:
    """Block ``block`` (1-based) of n_blocks is noised linearly in its window of t, plus eps * t."""
    u = min(max(n_blocks * t - (n_blocks - block), 0.0), 1.0)
    return 1.0 - ((1.0 - eps) * u + eps * t)


def expected_step_and_final_calls(order: torch.Tensor, steps: int) -> tuple[int, int]:
    """Calls of a cached sampler on one batch: one at step 0, one after every step that changed a
    token (if a step with masked positions follows), and one for the final argmax only when
    positions remain masked and the last step changed a token."""
    changed = sorted(set(order[order < steps].tolist()))
    step_calls = 1 + sum(1 for j in changed if j < steps - 1 and bool((order > j).any()))
    final_call = int(bool((order == steps).any()) and (steps - 1) in changed)
    return step_calls, final_call


def expected_calls(order: torch.Tensor, steps: int) -> int:
    return sum(expected_step_and_final_calls(order, steps))


# ----------------------------------------------------------------------------------------------
# Order of fixed schedulers.

@pytest.mark.parametrize("steps_per_position", [1, 2])
def test_arm_scheduler_generates_left_to_right(steps_per_position):
    L = 12
    cfg = DiffusionConfig(scheduler="arm", window_eps=1e-6)
    result = sample(FakeModel(uniform_table(L, 7)), build_scheduler(cfg), num=48, seq_len=L,
                    steps=steps_per_position * L, diffusion_cfg=cfg, t_min=0.0, seed=3)
    order = result.order
    assert order.shape == (48, L)
    if steps_per_position == 1:
        assert bool((order[:, 1:] > order[:, :-1]).all()), order
    else:
        assert bool((order[:, 1:] >= order[:, :-1]).all()), order
    # position i can only be generated inside its window: steps [i * spp, (i + 1) * spp)
    lo = torch.arange(L) * steps_per_position
    assert bool(((order >= lo) & (order < lo + steps_per_position)).all())
    assert bool((result.tokens != 6).all())


# ----------------------------------------------------------------------------------------------
# One reverse step is exact.

def _conditional_unmask_fractions(order: torch.Tensor, steps: int) -> list[tuple[float, int]]:
    """For each step j: fraction of positions still masked at t_j that unmasked at step j, and how many."""
    out = []
    for j in range(steps):
        at_risk = order >= j
        n = int(at_risk.sum())
        out.append((float((order[at_risk] == j).float().mean()) if n else float("nan"), n))
    return out


@pytest.mark.parametrize("name", ["mdlm", "poly", "block"])
def test_reverse_step_probability_matches_closed_form(name):
    L, N, steps, t_min = 8, 2500, 3, 0.1
    cfg = DiffusionConfig(scheduler=name, c1=0.7, block_size=2, window_eps=1e-3, mdlm_eps=1e-3)
    result = sample(FakeModel(uniform_table(L, 5)), build_scheduler(cfg), num=N, seq_len=L, steps=steps,
                    diffusion_cfg=cfg, t_min=t_min, final_argmax=False, seed=11)
    grid = [1.0 + (t_min - 1.0) * j / steps for j in range(steps + 1)]
    blocks = range(L // 2)
    for j in range(steps):
        t, s = grid[j], grid[j + 1]
        groups = [torch.arange(L)] if name != "block" else [torch.tensor([2 * b, 2 * b + 1]) for b in blocks]
        for g, positions in enumerate(groups):
            if name == "mdlm":
                a_t, a_s = alpha_mdlm(t), alpha_mdlm(s)
            elif name == "poly":
                a_t, a_s = alpha_poly(t, 0.7), alpha_poly(s, 0.7)
            else:
                a_t, a_s = alpha_block(t, g + 1, L // 2, 1e-3), alpha_block(s, g + 1, L // 2, 1e-3)
            p = (a_s - a_t) / (1.0 - a_t)
            frac, n = _conditional_unmask_fractions(result.order[:, positions], steps)[j]
            if n == 0:
                continue
            tol = 4.0 * math.sqrt(p * (1.0 - p) / n) + 1.0 / n
            assert abs(frac - p) <= tol, (name, j, g, frac, p, n)
    # never-unmasked positions stay masked without the final argmax, with order == steps
    still = result.tokens == 4
    assert torch.equal(still, result.order == steps)


def test_tokens_follow_the_denoiser_categorical_and_never_the_mask():
    """All positions unmask in one step (s = 0); counts per position pass a chi-square test."""
    probs = torch.tensor([[0.50, 0.25, 0.15, 0.07, 0.03],
                          [0.05, 0.05, 0.10, 0.30, 0.50],
                          [0.20, 0.20, 0.20, 0.20, 0.20]], dtype=torch.float64)
    table = torch.cat([probs.log(), torch.full((3, 1), 8.0, dtype=torch.float64)], dim=1)  # mask logit is large
    cfg = DiffusionConfig(scheduler="mdlm")
    N = 4000
    result = sample(FakeModel(table), build_scheduler(cfg), num=N, seq_len=3, steps=1, diffusion_cfg=cfg,
                    t_min=0.0, seed=5)
    assert bool((result.order == 0).all())
    assert bool((result.tokens != 5).all())
    for pos in range(3):
        counts = torch.bincount(result.tokens[:, pos], minlength=6)[:5].double()
        expected = N * probs[pos]
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        df = 4
        p_value = float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(chi2 / 2.0)))
        assert p_value > 1e-4, (pos, counts, expected, chi2)


def test_categorical_is_float64_and_handles_tiny_masses(monkeypatch):
    seen_dtypes = []
    real_multinomial = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen_dtypes.append(probs.dtype)
        return real_multinomial(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    # token 0 carries 1e-9 of the mass, token 1 a mass that underflows to 0 in float32 (exp(-120)).
    row = torch.tensor([math.log(1e-9), -120.0, 0.0, 0.0, 30.0])
    table = row.expand(6, -1).clone()
    cfg = DiffusionConfig(scheduler="mdlm")
    result = sample(FakeModel(table), build_scheduler(cfg), num=200, seq_len=6, steps=4, diffusion_cfg=cfg,
                    t_min=0.0, seed=1)
    assert seen_dtypes and all(d == torch.float64 for d in seen_dtypes)
    assert bool(((result.tokens == 2) | (result.tokens == 3)).all())
    both = torch.bincount(result.tokens.flatten(), minlength=5)
    assert both[2] > 400 and both[3] > 400
    log_p = sampler_mod.subs_log_probs(row[None], mask_token_id=4)
    assert log_p.dtype == torch.float64
    assert not bool(torch.isnan(log_p).any())
    logits = row.tolist()                                # the float32 values, exactly, as Python floats
    log_norm = math.log(sum(math.exp(v) for v in logits[:4]))
    assert abs(float(log_p[0, 0]) - (logits[0] - log_norm)) < 1e-12
    assert abs(float(log_p[0, 1]) - (logits[1] - log_norm)) < 1e-12
    assert float(log_p[0, 4]) == float("-inf")


def test_final_argmax_fills_remaining_positions_with_the_non_mask_argmax():
    table = torch.tensor([[0.0, 3.0, 1.0, 9.0],
                          [2.0, 0.0, 1.0, 9.0],
                          [0.0, 1.0, 4.0, 9.0]])          # column 3 is the mask: excluded by SUBS
    cfg = DiffusionConfig(scheduler="mdlm")
    result = sample(FakeModel(table), build_scheduler(cfg), num=300, seq_len=3, steps=1, diffusion_cfg=cfg,
                    t_min=0.8, seed=2)
    filled = result.order == 1
    assert 0 < int(filled.sum()) < filled.numel()
    argmax = torch.tensor([1, 0, 2]).expand(300, -1)
    assert torch.equal(result.tokens[filled], argmax[filled])
    assert bool((result.tokens != 3).all())
    assert result.argmax_filled == int(filled.sum())


@pytest.mark.parametrize("name", ["mdlm", "lomdm"])
def test_a_grid_ending_at_zero_samples_every_position_and_leaves_nothing_to_the_argmax(name):
    """At s = 0 the unmasking probability 1 - (s/t)^k is exactly 1: the last step samples whatever is
    left, so no position reaches the final argmax. The default grid ends there."""
    table = torch.tensor([[0.0, 3.0, 1.0, 9.0], [2.0, 0.0, 1.0, 9.0], [0.0, 1.0, 4.0, 9.0]])
    cfg = DiffusionConfig(scheduler=name)
    model = FakeModel(table, priority=torch.tensor([-2.0, 0.0, 2.0]) if name == "lomdm" else None)
    result = sample(model, build_scheduler(cfg), num=200, seq_len=3, steps=2, diffusion_cfg=cfg, seed=2)
    assert result.argmax_filled == 0
    assert int(result.order.max()) < 2 and bool((result.tokens != 3).all())
    # Sampled, not argmax: every position takes non-argmax tokens too (probability of their absence
    # in 200 draws from softmax(table) is below 1e-10 for each position).
    for pos in range(3):
        assert len(torch.unique(result.tokens[:, pos])) > 1


# ----------------------------------------------------------------------------------------------
# Learned order: k_hat from the psi head.

def _expected_order_moments(k: float, grid: list[float]) -> tuple[float, float]:
    """Mean and variance of the unmasking step when k_hat is constant: P(masked at t_j) = t_j^k."""
    steps = len(grid) - 1
    probs = [grid[j] ** k - grid[j + 1] ** k for j in range(steps)] + [grid[steps] ** k]
    mean = sum(j * p for j, p in enumerate(probs))
    return mean, sum((j - mean) ** 2 * p for j, p in enumerate(probs))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("reverse_c2_zero", [False, True])
def test_learned_priority_sets_the_order(reverse_c2_zero):
    L, N, steps, t_min, c1, c2 = 8, 600, 16, 1e-3, 0.7, 0.65
    priority = torch.linspace(-3.0, 3.0, L)
    cfg = DiffusionConfig(scheduler="lomdm", c1=c1, c2=c2)
    model = FakeModel(uniform_table(L, 6), priority=priority)
    result = sample(model, build_scheduler(cfg), num=N, seq_len=L, steps=steps, diffusion_cfg=cfg,
                    t_min=t_min, seed=7, reverse_c2_zero=reverse_c2_zero)
    sig = torch.sigmoid(priority.double())
    k = torch.full((L,), c1, dtype=torch.float64) if reverse_c2_zero else c1 + c2 * (sig - sig.mean())
    grid = [1.0 + (t_min - 1.0) * j / steps for j in range(steps + 1)]
    mean_order = result.order.double().mean(0)
    for i in range(L):
        mean, var = _expected_order_moments(float(k[i]), grid)
        assert abs(float(mean_order[i]) - mean) <= 4.5 * math.sqrt(var / N), (i, float(mean_order[i]), mean)
    first, second = result.order[:, : L // 2].double().mean(1), result.order[:, L // 2:].double().mean(1)
    diff = first - second
    z = float(diff.mean() / (diff.std() / math.sqrt(N)))
    if reverse_c2_zero:
        assert model.psi.calls == 0
        assert abs(z) < 4.0, z
    else:
        assert model.psi.calls == expected_step_and_final_calls(result.order, steps)[0]
        assert _spearman(k, mean_order) < -0.9
        assert z > 4.0, z                               # high-priority (right) half goes first


# ----------------------------------------------------------------------------------------------
# Step count, caching, time conditioning, batching.

def test_step_count_and_cache_cut_model_calls():
    L, steps = 8, 256
    cfg = DiffusionConfig(scheduler="mdlm")
    model = FakeModel(uniform_table(L, 5))
    result = sample(model, build_scheduler(cfg), num=3, seq_len=L, steps=steps, diffusion_cfg=cfg, seed=4)
    assert int(result.order.min()) >= 0 and int(result.order.max()) <= steps
    assert result.model_calls == model.backbone.feature_calls
    assert result.model_calls == expected_calls(result.order, steps)
    assert result.model_calls <= 3 * L + 1 < steps


def test_batches_count_calls_per_batch():
    L, steps = 6, 40
    cfg = DiffusionConfig(scheduler="poly", c1=1.0)
    model = FakeModel(uniform_table(L, 5))
    result = sample(model, build_scheduler(cfg), num=5, seq_len=L, steps=steps, diffusion_cfg=cfg,
                    batch_size=2, seed=9)
    assert result.tokens.shape == (5, L) and result.order.shape == (5, L)
    per_batch = [expected_calls(result.order[i:i + 2], steps) for i in range(0, 5, 2)]
    assert result.model_calls == sum(per_batch) == model.backbone.feature_calls
    assert all(c <= steps + 1 for c in per_batch)


@pytest.mark.parametrize("name", ["mdlm", "lomdm"])
def test_time_conditioning_calls_every_step_with_sigma_t(name):
    L, steps, t_min = 5, 10, 0.05
    cfg = DiffusionConfig(scheduler=name)
    model = FakeModel(uniform_table(L, 4), priority=torch.arange(L) if name == "lomdm" else None,
                      time_conditioning=True)
    result = sample(model, build_scheduler(cfg), num=2, seq_len=L, steps=steps, diffusion_cfg=cfg,
                    t_min=t_min, seed=0)
    grid = [1.0 + (t_min - 1.0) * j / steps for j in range(steps + 1)]
    remaining = bool((result.order == steps).any())
    # steps after every position is clean need no call; the final argmax runs at sigma = t_min
    last_needed = max(j for j in range(steps) if bool((result.order >= j).any()))
    expected_sigmas = grid[:last_needed + 1] + ([t_min] if remaining else [])
    assert result.model_calls == len(expected_sigmas) == len(model.backbone.sigmas)
    for sigma, t in zip(model.backbone.sigmas, expected_sigmas):
        assert torch.allclose(sigma.double(), torch.full((2,), t, dtype=torch.float64), atol=1e-7)
    if name == "lomdm":                                 # exponents are needed at every step, not for the argmax
        assert model.psi.calls == last_needed + 1


def test_same_seed_same_samples_and_mode_restored():
    cfg = DiffusionConfig(scheduler="mdlm")
    model = FakeModel(torch.randn(6, 7, generator=torch.Generator().manual_seed(0)))
    model.train()
    a = sample(model, build_scheduler(cfg), num=4, seq_len=6, steps=8, diffusion_cfg=cfg, seed=21)
    b = sample(model, build_scheduler(cfg), num=4, seq_len=6, steps=8, diffusion_cfg=cfg, seed=21)
    c = sample(model, build_scheduler(cfg), num=4, seq_len=6, steps=8, diffusion_cfg=cfg, seed=22)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.order, b.order)
    assert not (torch.equal(a.tokens, c.tokens) and torch.equal(a.order, c.order))
    assert model.training


def test_real_backbone_call_count_through_a_wrapper():
    """The real DiT (model package) under a call-counting wrapper agrees with the sampler's count."""
    from lomdm_dist.model import build_model

    torch.manual_seed(0)
    dcfg = DiffusionConfig(scheduler="mdlm")
    model = build_model(ModelConfig(n_layers=1, d_model=16, n_heads=2, cond_dim=8), dcfg, vocab_size=11)
    calls = []
    real_features = model.backbone.features
    model.backbone.features = lambda tokens, c: (calls.append(tokens.clone()), real_features(tokens, c))[1]
    steps = 64
    result = sample(model, build_scheduler(dcfg), num=2, seq_len=8, steps=steps, diffusion_cfg=dcfg, seed=1)
    assert result.model_calls == len(calls) == expected_calls(result.order, steps) < steps
    assert bool((result.tokens >= 0).all() & (result.tokens < 10).all())
    assert bool((calls[0] == 10).all())                 # the first call sees the all-mask state


def test_real_lomdm_model_evaluates_psi_once_per_call():
    """The real DiT and psi head with the real lomdm_schedule: psi runs on each fresh network output."""
    from lomdm_dist.model import build_model

    torch.manual_seed(0)
    dcfg = DiffusionConfig(scheduler="lomdm", c1=0.7, c2=0.65)
    model = build_model(ModelConfig(n_layers=1, d_model=16, n_heads=2, cond_dim=8), dcfg, vocab_size=9)
    with torch.no_grad():
        model.psi.out.weight.normal_()                  # zero-initialised: give the exponents a spread
    counts = {"features": 0, "psi": 0}
    real_features, real_psi_forward = model.backbone.features, model.psi.forward

    def count(name, fn):
        def wrapped(*args):
            counts[name] += 1
            return fn(*args)
        return wrapped

    model.backbone.features = count("features", real_features)
    model.psi.forward = count("psi", real_psi_forward)
    steps = 32
    result = sample(model, build_scheduler(dcfg), num=3, seq_len=8, steps=steps, diffusion_cfg=dcfg, seed=2)
    assert result.model_calls == counts["features"] == expected_calls(result.order, steps)
    assert counts["psi"] == expected_step_and_final_calls(result.order, steps)[0]
    assert bool((result.tokens >= 0).all() & (result.tokens < 8).all())


@pytest.mark.gpu
def test_sampling_on_cuda_matches_the_categorical():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]], dtype=torch.float64)
    table = torch.cat([probs.log(), torch.full((2, 1), 5.0, dtype=torch.float64)], dim=1)
    priority = torch.tensor([1.0, -1.0])
    for name in ("mdlm", "lomdm"):
        cfg = DiffusionConfig(scheduler=name)
        model = FakeModel(table, priority=priority if name == "lomdm" else None).cuda()
        result = sample(model, build_scheduler(cfg), num=4000, seq_len=2, steps=4, diffusion_cfg=cfg,
                        t_min=0.0, seed=3, device="cuda")
        assert result.tokens.is_cuda and bool((result.tokens < 3).all())
        for pos in range(2):
            freq = torch.bincount(result.tokens[:, pos].cpu(), minlength=3).double() / 4000
            assert bool(((freq - probs[pos]).abs() <= 4 * (probs[pos] * (1 - probs[pos]) / 4000).sqrt()).all())


def test_bad_arguments_name_the_problem():
    cfg = DiffusionConfig(scheduler="mdlm")
    model, sched = FakeModel(uniform_table(4, 3)), build_scheduler(cfg)
    for kwargs, word in (({"num": 0}, "num"), ({"steps": -1}, "steps"), ({"seq_len": 0}, "seq_len"),
                         ({"t_min": 1.0}, "t_min"), ({"batch_size": 0}, "batch_size"),
                         ({"reverse_c2_zero": True}, "reverse_c2_zero")):
        args = {"num": 2, "seq_len": 4, "steps": 3, **kwargs}
        with pytest.raises(ValueError, match=word):
            sample(model, sched, diffusion_cfg=cfg, **args)
    lcfg = DiffusionConfig(scheduler="lomdm")
    with pytest.raises(ValueError, match="psi"):
        sample(model, build_scheduler(lcfg), num=1, seq_len=4, steps=2, diffusion_cfg=lcfg)


# ----------------------------------------------------------------------------------------------
# tools/sample.py

def _load_tool():
    return load_tool("sample")


def _run_tool(argv):
    tool = _load_tool()
    with pytest.raises(SystemExit) as exc:
        tool.main(argv)
    return exc.value.code


def test_tool_rejects_bad_arguments(tmp_path, capsys):
    out = str(tmp_path / "s.jsonl")
    ckpt = str(tmp_path)
    assert _run_tool(["--ckpt", str(tmp_path / "missing"), "--out", out]) == 2
    assert "missing" in capsys.readouterr().err
    assert _run_tool(["--ckpt", ckpt, "--out", out, "--num", "0"]) == 2
    assert "--num" in capsys.readouterr().err
    assert _run_tool(["--ckpt", ckpt, "--out", out, "--steps", "-3"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert _run_tool(["--ckpt", ckpt, "--out", str(tmp_path / "no" / "dir" / "s.jsonl")]) == 2
    assert "--out" in capsys.readouterr().err
    assert _run_tool(["--ckpt", ckpt, "--out", str(tmp_path)]) == 2
    assert "directory" in capsys.readouterr().err
    assert _run_tool(["--ckpt", ckpt, "--out", out]) == 2      # a directory without checkpoints
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists()


def test_tool_exit_status_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--ckpt", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_tool_end_to_end_from_a_checkpoint(tmp_path, capsys):
    """A checkpoint saved by the trainer's checkpoint module, sampled and decoded with GPT-2 BPE."""
    import json

    tok = write_tiny_checkpoint(tmp_path / "run")
    out = tmp_path / "samples.jsonl"
    tool = _load_tool()
    assert tool.main(["--ckpt", str(tmp_path / "run"), "--num", "3", "--steps", "6", "--out", str(out),
                      "--seed", "4", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3
    for rec in lines:
        assert len(rec["tokens"]) == 12 and len(rec["order"]) == 12
        assert all(0 <= o <= 6 for o in rec["order"])
        assert rec["text"] == tok.decode([t for t in rec["tokens"] if t < tok.vocab_size])
        counts = torch.bincount(torch.tensor(rec["tokens"])).double()
        p = counts[counts > 0] / 12
        assert abs(rec["entropy"] - float(-(p * p.log()).sum())) < 1e-9
    assert "model calls" in capsys.readouterr().err
    assert _run_tool(["--ckpt", str(tmp_path / "run"), "--num", "1", "--steps", "2", "--out", str(out),
                      "--reverse-c2-zero"]) == 2
