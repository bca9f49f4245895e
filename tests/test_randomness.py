"""Counter-based randomness, checked against a pure-Python hash and against distributional facts.

The training step's t and masks must be functions of (seed, step, stream, global row, position)
only, so that any split of the global batch over ranks or microbatches gives every row the same
draws. These tests pin the hash to an independent implementation, check that property directly,
and check that the uniforms and the stratified times have the distribution they claim.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from lomdm_dist.diffusion import randomness

TWO32 = 2 ** 32


def lowbias32_reference(x: int) -> int:
    """Wellons' lowbias32 written with explicit arithmetic mod 2**32 on Python integers."""
    x = x % TWO32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) % TWO32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) % TWO32
    x = x ^ (x >> 16)
    return x


def scalar_key_reference(*parts: int) -> int:
    """Fold integers into a 32-bit key: low word, high word and sign of each part, in order."""
    key = 0x9E3779B9
    for part in parts:
        for word in (part % TWO32, (part // TWO32) % TWO32, int(part < 0)):
            key = lowbias32_reference(key ^ lowbias32_reference(word + 0x9E3779B9))
    return key


def uniform_reference(seed: int, step: int, stream: int, row: int, position: int) -> float:
    """The documented uniform recipe, one entry at a time in Python integers and exact fractions.

    key = fold(seed, step, stream); h = mix(key ^ mix(row ^ golden)); h = mix(h ^ mix(pos + c));
    26 high bits and 27 low bits from two further mixes give a 53-bit fraction.
    """
    key = scalar_key_reference(seed, step, stream)
    h = lowbias32_reference(key ^ lowbias32_reference((row % TWO32) ^ 0x9E3779B9))
    h = lowbias32_reference(h ^ lowbias32_reference((position + 0x632BE5AB) % TWO32))
    hi = lowbias32_reference(h ^ 0x5BD1E995) >> 6
    lo = lowbias32_reference(h ^ 0x27D4EB2F) >> 5
    return (hi * 2 ** 27 + lo) / 2 ** 53


def test_tensor_hash_equals_python_lowbias32():
    gen = np.random.default_rng(0)
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, TWO32 - 2, TWO32 - 1]
    values += [int(v) for v in gen.integers(0, TWO32, size=2000, dtype=np.uint64)]
    got = randomness.mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    expected = [lowbias32_reference(v) for v in values]
    assert got == expected
    assert [randomness.mix32_int(v) for v in values] == expected
    # The scalar version reduces its input mod 2**32 like the reference.
    assert randomness.mix32_int(TWO32 + 5) == lowbias32_reference(5)


def test_uniform_matches_python_recipe_bit_for_bit():
    rows = torch.tensor([0, 1, 7, 123_456, 2 ** 31 + 3, 2 ** 40 + 11])
    got = randomness.uniform(seed=3, step=17, stream=randomness.STREAM_MASK, rows=rows, num_positions=5)
    assert got.dtype == torch.float64 and got.shape == (6, 5)
    for b, row in enumerate(rows.tolist()):
        for i in range(5):
            assert got[b, i].item() == uniform_reference(3, 17, randomness.STREAM_MASK, row, i)


def test_scalar_key_separates_signs_and_high_words():
    for parts in [(0,), (5, 9, 16), (-3, 2 ** 40 + 7, 1), (2 ** 63 - 1, -(2 ** 63))]:
        assert randomness.scalar_key(*parts) == scalar_key_reference(*parts)
    keys = {randomness.scalar_key(*parts) for parts in
            [(0, 0, 1), (0, 1, 0), (1, 0, 0), (-1, 0, 0), (2 ** 32, 0, 0), (0, 0, 2 ** 32), (0, 0, 1, 0)]}
    assert len(keys) == 7


def test_row_draws_do_not_depend_on_the_split():
    all_rows = torch.arange(8)
    full = randomness.uniform(5, 9, randomness.STREAM_MASK, all_rows, 12)
    halves = torch.cat([randomness.uniform(5, 9, randomness.STREAM_MASK, all_rows[:4], 12),
                        randomness.uniform(5, 9, randomness.STREAM_MASK, all_rows[4:], 12)])
    assert torch.equal(full, halves)
    perm = torch.tensor([6, 1, 4, 0])
    assert torch.equal(randomness.uniform(5, 9, randomness.STREAM_MASK, perm, 12), full[perm])
    # Position i of a row does not depend on how many positions were asked for.
    assert torch.equal(randomness.uniform(5, 9, randomness.STREAM_MASK, all_rows, 5), full[:, :5])

    t_full = randomness.diffusion_times(5, 9, all_rows, 8, t_eps=1e-3)
    t_halves = torch.cat([randomness.diffusion_times(5, 9, all_rows[:4], 8, t_eps=1e-3),
                          randomness.diffusion_times(5, 9, all_rows[4:], 8, t_eps=1e-3)])
    assert torch.equal(t_full, t_halves)


def test_uniforms_pass_kolmogorov_smirnov():
    u = randomness.uniform(11, 2, randomness.STREAM_MASK, torch.arange(400), 50).flatten().numpy()
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # Neighbouring coordinates and streams are not correlated (checks the hash mixes every input).
    u_next_step = randomness.uniform(11, 3, randomness.STREAM_MASK, torch.arange(400), 50).flatten().numpy()
    u_other_stream = randomness.uniform(11, 2, randomness.STREAM_MASK + 1, torch.arange(400), 50).flatten().numpy()
    u_other_seed = randomness.uniform(12, 2, randomness.STREAM_MASK, torch.arange(400), 50).flatten().numpy()
    bound = 4.0 / np.sqrt(u.size)  # 4 standard errors of a correlation between independent samples
    for other in (u_next_step, u_other_stream, u_other_seed):
        assert abs(np.corrcoef(u, other)[0, 1]) < bound
    by_position = u.reshape(400, 50)
    assert abs(np.corrcoef(by_position[:, :-1].ravel(), by_position[:, 1:].ravel())[0, 1]) < bound
    assert abs(np.corrcoef(by_position[:-1].ravel(), by_position[1:].ravel())[0, 1]) < bound


@pytest.mark.parametrize("n, t_eps", [(1, 1e-3), (7, 1e-3), (64, 0.05), (1000, 1e-3)])
def test_antithetic_times_fill_each_stratum_once(n, t_eps):
    for step in range(3):
        t = randomness.diffusion_times(4, step, torch.arange(n), n, t_eps=t_eps)
        assert t.dtype == torch.float64
        assert bool((t >= t_eps).all()) and bool((t <= 1.0).all())
        lower = t_eps + (1 - t_eps) * torch.arange(n, dtype=torch.float64) / n
        upper = t_eps + (1 - t_eps) * torch.arange(1, n + 1, dtype=torch.float64) / n
        ordered = torch.sort(t).values
        # Exactly one time in each stratum [i/n, (i+1)/n) mapped to [t_eps, 1]; row i lands in stratum i.
        assert bool((ordered >= lower - 1e-12).all()) and bool((ordered < upper + 1e-12).all())
        assert torch.equal(ordered, t)
    # A rank holding rows 4..7 of a global batch of 8 gets strata 4..7.
    t_part = randomness.diffusion_times(4, 0, torch.arange(4, 8), 8, t_eps=t_eps)
    u = (t_part - t_eps) / (1 - t_eps)
    assert torch.equal(torch.floor(u * 8).long(), torch.arange(4, 8))


def test_plain_times_are_uniform_on_the_interval():
    t_eps = 0.1
    t = randomness.diffusion_times(1, 0, torch.arange(5000), 5000, t_eps=t_eps, antithetic=False).numpy()
    assert t.min() >= t_eps and t.max() <= 1.0
    assert stats.kstest(t, "uniform", args=(t_eps, 1 - t_eps)).pvalue > 1e-3
