"""Forward schedulers against closed forms written here, independently of the library code.

Each fixed scheduler's alpha (probability that a position is still clean) is restated below as a
plain Python function of t; the velocity is then checked by finite differences of that function,
the reverse-step probability and log q by their definitions.
"""

from __future__ import annotations

import pytest
import torch

from lomdm_dist.config import DiffusionConfig
from lomdm_dist.diffusion.schedulers import (LoMDMScheduler, MDLMLogLinear, Polynomial, Windowed,
                                             build_scheduler)

SEQ_LEN = 8


def alpha_mdlm(t: float, eps: float) -> float:
    """MDLM log-linear: sigma(t) = -log(1 - (1 - eps) t) and alpha = exp(-sigma) = 1 - (1 - eps) t."""
    return 1.0 - (1.0 - eps) * t


def alpha_poly(t: float, c: float) -> float:
    return 1.0 - t ** c


def alpha_window(t: float, position: int, block_size: int, seq_len: int, eps: float) -> float:
    """Block diffusion: the block holding ``position`` (0-based) is noised linearly over its own
    window of length 1/n_blocks; the first block's window is the last one, [1 - 1/n_blocks, 1].
    A small eps * t leak keeps alpha strictly decreasing outside the window."""
    n_blocks = seq_len // block_size
    block = position // block_size  # 0-based
    start = 1.0 - (block + 1) / n_blocks
    if t <= start:
        progress = 0.0
    elif t >= start + 1.0 / n_blocks:
        progress = 1.0
    else:
        progress = (t - start) * n_blocks
    return 1.0 - ((1.0 - eps) * progress + eps * t)


def window_edges(block_size: int, seq_len: int) -> list[float]:
    n_blocks = seq_len // block_size
    return [m / n_blocks for m in range(n_blocks + 1)]


# name -> (scheduler, alpha(t, position) closed form, window edges where alpha has kinks)
CASES = {
    "mdlm": (MDLMLogLinear(1e-3), lambda t, i: alpha_mdlm(t, 1e-3), []),
    "mdlm_eps0": (MDLMLogLinear(0.0), lambda t, i: alpha_mdlm(t, 0.0), []),
    "poly_0.7": (Polynomial(0.7), lambda t, i: alpha_poly(t, 0.7), []),
    "poly_2": (Polynomial(2.0), lambda t, i: alpha_poly(t, 2.0), []),
    "arm": (Windowed(1, 1e-2, "arm"), lambda t, i: alpha_window(t, i, 1, SEQ_LEN, 1e-2), window_edges(1, SEQ_LEN)),
    "block": (Windowed(4, 1e-3, "block"), lambda t, i: alpha_window(t, i, 4, SEQ_LEN, 1e-3),
              window_edges(4, SEQ_LEN)),
}
# Schedulers that reach alpha(1) = 0 exactly (MDLM with eps > 0 stops at alpha(1) = eps by design).
REACHES_ZERO = ["mdlm_eps0", "poly_0.7", "poly_2", "arm", "block"]


def reference_alpha(name: str, t: torch.Tensor) -> torch.Tensor:
    _, alpha, _ = CASES[name]
    return torch.tensor([[alpha(float(tb), i) for i in range(SEQ_LEN)] for tb in t], dtype=torch.float64)


def interior_times(edges: list[float], n: int = 97, margin: float = 2e-3) -> torch.Tensor:
    t = torch.linspace(0.02, 0.99, n, dtype=torch.float64)
    keep = [all(abs(float(x) - e) > margin for e in edges) for x in t]
    return t[torch.tensor(keep)]


@pytest.mark.parametrize("name", list(CASES))
def test_alpha_matches_closed_form(name):
    scheduler, _, _ = CASES[name]
    t = torch.linspace(1e-4, 1.0, 301, dtype=torch.float64)
    sched = scheduler.schedule(t, SEQ_LEN)
    alpha = reference_alpha(name, t)
    torch.testing.assert_close(sched.log_clean.exp(), alpha, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sched.log_masked.exp(), 1.0 - alpha, rtol=1e-10, atol=1e-12)
    positive = alpha > 1e-6
    torch.testing.assert_close(sched.log_clean[positive], alpha[positive].log(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_velocity_is_minus_alpha_prime_over_one_minus_alpha(name):
    scheduler, alpha, edges = CASES[name]
    t = interior_times(edges)
    h = 1e-6
    expected = torch.tensor([[-(alpha(float(tb) + h, i) - alpha(float(tb) - h, i)) / (2 * h) / (1 - alpha(float(tb), i))
                              for i in range(SEQ_LEN)] for tb in t], dtype=torch.float64)
    torch.testing.assert_close(scheduler.schedule(t, SEQ_LEN).velocity, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", list(CASES))
def test_alpha_boundaries_and_strict_decrease(name):
    scheduler, _, _ = CASES[name]
    ends = scheduler.schedule(torch.tensor([0.0, 1.0], dtype=torch.float64), SEQ_LEN)
    assert torch.equal(ends.log_clean[0].exp(), torch.ones(SEQ_LEN, dtype=torch.float64))  # alpha(0) = 1
    alpha_one = ends.log_clean[1].exp()
    if name in REACHES_ZERO:
        assert torch.equal(alpha_one, torch.zeros(SEQ_LEN, dtype=torch.float64))
    else:
        torch.testing.assert_close(alpha_one, torch.full((SEQ_LEN,), 1e-3, dtype=torch.float64))
    # Strictly decreasing alpha <=> strictly increasing log(1 - alpha), resolved in float64.
    t = torch.linspace(0.0, 1.0, 4001, dtype=torch.float64)
    log_masked = scheduler.schedule(t, SEQ_LEN).log_masked
    assert bool((log_masked[1:] > log_masked[:-1]).all())


@pytest.mark.parametrize("name", list(CASES))
def test_unmask_prob_is_the_forward_posterior(name):
    scheduler, _, _ = CASES[name]
    t = torch.tensor([0.9, 0.5, 0.37, 0.12, 0.05, 1.0], dtype=torch.float64)
    s = torch.tensor([0.7, 0.49, 0.0, 0.11, 0.01, 0.3], dtype=torch.float64)
    a_t, a_s = reference_alpha(name, t), reference_alpha(name, s)
    expected = (a_s - a_t) / (1 - a_t)
    got = scheduler.unmask_prob(t, s, SEQ_LEN)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(got[2], torch.ones(SEQ_LEN, dtype=torch.float64))  # s = 0: everything is revealed


@pytest.mark.parametrize("name", list(CASES))
def test_log_q_is_the_bernoulli_log_likelihood(name):
    scheduler, _, _ = CASES[name]
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(5, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    masks = torch.rand(3, 5, SEQ_LEN, generator=gen) < 0.5
    valid = torch.ones(5, SEQ_LEN, dtype=torch.bool)
    valid[1, 6:] = False
    valid[4, 3:] = False
    p_masked = 1.0 - reference_alpha(name, t)
    direct = torch.distributions.Bernoulli(probs=p_masked).log_prob(masks.double())
    expected = (direct * valid).sum(-1)
    got = scheduler.log_q(scheduler.schedule(t, SEQ_LEN), masks, valid)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_lomdm_scheduler_uses_per_position_exponents():
    gen = torch.Generator().manual_seed(1)
    k = 0.05 + 1.3 * torch.rand(4, SEQ_LEN, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.01, 0.3, 0.77, 0.999], dtype=torch.float64)
    scheduler = LoMDMScheduler(0.7, 0.65)
    sched = scheduler.schedule(t, SEQ_LEN, k)
    alpha = 1.0 - t[:, None] ** k
    torch.testing.assert_close(sched.log_clean.exp(), alpha, rtol=1e-10, atol=1e-12)
    h = 1e-6
    fd = -((1 - (t[:, None] + h) ** k) - (1 - (t[:, None] - h) ** k)) / (2 * h) / (1 - alpha)
    torch.testing.assert_close(sched.velocity, fd, rtol=1e-6, atol=1e-8)
    s = t / 3
    expected = ((1 - s[:, None] ** k) - alpha) / (1 - alpha)
    torch.testing.assert_close(scheduler.unmask_prob(t, s, SEQ_LEN, k), expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="exponents"):
        scheduler.schedule(t, SEQ_LEN)


def test_float32_times_agree_with_float64():
    t64 = torch.linspace(1e-3, 1.0, 50, dtype=torch.float64)
    for name, (scheduler, _, _) in CASES.items():
        s32, s64 = scheduler.schedule(t64.float(), SEQ_LEN), scheduler.schedule(t64, SEQ_LEN)
        torch.testing.assert_close(s32.velocity.double(), s64.velocity, rtol=1e-4, atol=0, msg=name)
        torch.testing.assert_close(s32.log_masked.double(), s64.log_masked, rtol=1e-4, atol=1e-5, msg=name)


def test_build_scheduler_reads_the_config():
    assert isinstance(build_scheduler(DiffusionConfig(scheduler="mdlm", mdlm_eps=0.01)), MDLMLogLinear)
    assert build_scheduler(DiffusionConfig(scheduler="mdlm", mdlm_eps=0.01)).eps == 0.01
    assert build_scheduler(DiffusionConfig(scheduler="poly", c1=1.5)).exponent == 1.5
    arm = build_scheduler(DiffusionConfig(scheduler="arm", window_eps=0.02))
    assert (arm.name, arm.block_size, arm.eps) == ("arm", 1, 0.02)
    block = build_scheduler(DiffusionConfig(scheduler="block", block_size=4, window_eps=0.03))
    assert (block.name, block.block_size, block.eps) == ("block", 4, 0.03)
    lomdm = build_scheduler(DiffusionConfig(scheduler="lomdm", c1=0.8, c2=0.5))
    assert lomdm.learned and (lomdm.c1, lomdm.c2) == (0.8, 0.5)
    with pytest.raises(ValueError, match="diffusion.scheduler"):
        build_scheduler(DiffusionConfig(scheduler="cosine"))


def test_block_size_must_divide_the_length():
    with pytest.raises(ValueError, match="block_size 3 does not divide sequence length 8"):
        Windowed(3, 1e-3, "block").schedule(torch.tensor([0.5]), 8)
