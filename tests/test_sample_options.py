"""Conditioned and nucleus sampling against closed forms: given (clamped) positions, the psi head on
whole rows, nucleus sets by enumeration, and the sampling tool's --prefix / --infill / --top-p /
--order-png options.

The fake model of ``test_sampler`` has exactly known outputs (logits a fixed table per position,
psi a fixed priority per position); expected values are computed here, never with the sampler's
helpers.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from lomdm_dist.config import DiffusionConfig
from helpers_checkpoint import write_tiny_checkpoint
from lomdm_dist.diffusion.sampler import nucleus, sample
from lomdm_dist.diffusion.schedulers import build_scheduler
from test_sampler import FakeModel, uniform_table
from helpers_tools import load_tool



def _chi2_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = expected.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(chi2 / 2.0)))


# ----------------------------------------------------------------------------------------------
# Given positions


@pytest.mark.parametrize("per_row", [False, True])
def test_given_positions_never_change_and_the_rest_follows_the_model(per_row):
    """The model prefers token 2 everywhere (probability e^10 / (e^10 + 3) = 0.99986); given tokens
    0, 1, 3 stay, are never counted as unmasked or argmax-filled, and the first call sees them."""
    L, V, N, steps = 8, 5, 64, 4
    table = torch.zeros(L, V)
    table[:, 2] = 10.0
    mask = V - 1
    if per_row:   # each row its own given positions: row r clamps position r % L to token r % 4 (not 2)
        given = torch.full((N, L), mask)
        for r in range(N):
            given[r, r % L] = [0, 1, 3, 0][r % 4]
    else:
        given = torch.tensor([0, 1, 3, mask, mask, mask, 3, mask])
    model = FakeModel(table)
    seen = []
    real_features = model.backbone.features
    model.backbone.features = lambda tokens, c: (seen.append(tokens.clone()), real_features(tokens, c))[1]
    cfg = DiffusionConfig(scheduler="mdlm")
    result = sample(model, build_scheduler(cfg), num=N, seq_len=L, steps=steps, diffusion_cfg=cfg, t_min=0.6,
                    seed=3, given=given)
    full = given.expand(N, L)
    is_given = full != mask
    assert torch.equal(result.given, is_given)
    assert torch.equal(result.tokens[is_given], full[is_given])
    assert bool((result.order[is_given] == -1).all())
    assert bool((result.order[~is_given] >= 0).all()) and bool((result.order[~is_given] <= steps).all())
    assert result.argmax_filled == int((result.order == steps).sum()) > 0     # t_min = 0.6 leaves some
    free_tokens = result.tokens[~is_given]
    assert float((free_tokens == 2).double().mean()) >= 0.99
    assert torch.equal(seen[0], full)                                         # the walk starts from given


def test_psi_sees_the_whole_row_with_given_positions():
    """With the left half given, the free positions' exponents are c1 + c2 (sigmoid(g_i) - mean over
    *all* L positions): NormSig is centred on the whole row, given positions included."""
    L, N, steps, t_min, c1, c2 = 8, 600, 16, 1e-3, 0.7, 0.65
    priority = torch.tensor([-6.0] * 4 + torch.linspace(1.0, 3.0, 4).tolist())   # given: low priority
    cfg = DiffusionConfig(scheduler="lomdm", c1=c1, c2=c2)
    given = torch.tensor([0, 1, 2, 3] + [5] * 4)
    result = sample(FakeModel(uniform_table(L, 6), priority=priority), build_scheduler(cfg), num=N, seq_len=L,
                    steps=steps, diffusion_cfg=cfg, t_min=t_min, seed=7, given=given)
    grid = [1.0 + (t_min - 1.0) * j / steps for j in range(steps + 1)]
    sig = torch.sigmoid(priority.double())

    def z_scores(centre: float) -> list[float]:
        out = []
        for i in range(4, L):
            k = c1 + c2 * (float(sig[i]) - centre)
            probs = [grid[j] ** k - grid[j + 1] ** k for j in range(steps)] + [grid[steps] ** k]
            mean = sum(j * p for j, p in enumerate(probs))
            var = sum((j - mean) ** 2 * p for j, p in enumerate(probs))
            out.append((float(result.order[:, i].double().mean()) - mean) / math.sqrt(var / N))
        return out

    assert all(abs(z) <= 4.5 for z in z_scores(float(sig.mean()))), z_scores(float(sig.mean()))
    # centred on the free positions only, the prediction is far off: the test can tell the two apart
    assert min(abs(z) for z in z_scores(float(sig[4:].mean()))) > 4.5


def test_given_rows_are_checked():
    cfg = DiffusionConfig(scheduler="mdlm")
    model, sched = FakeModel(uniform_table(4, 3)), build_scheduler(cfg)
    for given, word in ((torch.tensor([0, 1, 2]), "shape"), (torch.tensor([0, 5, 2, 2]), r"\[0, 2\]"),
                        (torch.tensor([0.0, 1.0, 2.0, 2.0]), "integer"), (torch.full((3, 4), 2), "shape")):
        with pytest.raises(ValueError, match=word):
            sample(model, sched, num=2, seq_len=4, steps=2, diffusion_cfg=cfg, given=given)


# ----------------------------------------------------------------------------------------------
# Nucleus sampling


def _smallest_set(probs: list[float], p: float) -> set[int]:
    """By enumeration: among the subsets of fewest tokens whose mass reaches p, the most probable one."""
    for size in range(1, len(probs) + 1):
        reaching = [set(s) for s in itertools.combinations(range(len(probs)), size)
                    if sum(probs[i] for i in s) >= p]
        if reaching:
            return max(reaching, key=lambda s: sum(probs[i] for i in s))
    raise AssertionError("unreachable: the full set has mass 1")


def test_nucleus_keeps_exactly_the_smallest_set_with_mass_p():
    dyadic = [0.125, 0.5, 0.03125, 0.25, 0.09375]            # exact in binary: boundaries are exact
    rand = torch.rand(7, generator=torch.Generator().manual_seed(0)).double()
    rand = (rand / rand.sum()).tolist()
    for probs, ps in ((dyadic, [0.3, 0.5, 0.6, 0.75, 0.8, 0.875, 0.9, 0.96875, 0.99]),
                      (rand, [0.1, 0.33, 0.5, 0.77, 0.95])):
        row = torch.tensor([probs], dtype=torch.float64)
        for p in ps:
            kept = nucleus(row, p)[0]
            expected = _smallest_set(probs, p)
            assert {i for i in range(len(probs)) if kept[i] > 0} == expected, (probs, p)
            mass = sum(probs[i] for i in expected)
            for i in expected:
                assert abs(float(kept[i]) - probs[i] / mass) <= 1e-15
    assert nucleus(torch.tensor([dyadic], dtype=torch.float64), 1.0).tolist() == [dyadic]


def test_sampling_with_top_p_draws_from_the_nucleus():
    probs = torch.tensor([[0.50, 0.25, 0.15, 0.07, 0.03]], dtype=torch.float64)
    table = torch.cat([probs.log(), torch.full((1, 1), 8.0, dtype=torch.float64)], dim=1)
    cfg = DiffusionConfig(scheduler="mdlm")
    N = 3000
    result = sample(FakeModel(table), build_scheduler(cfg), num=N, seq_len=1, steps=1, diffusion_cfg=cfg,
                    seed=5, top_p=0.8)                       # nucleus {0, 1, 2}: 0.75 < 0.8 <= 0.9
    counts = torch.bincount(result.tokens[:, 0], minlength=6).double()
    assert counts[3:].sum() == 0
    expected = N * probs[0, :3] / probs[0, :3].sum()
    assert _chi2_p_value(counts[:3], expected) > 1e-4, (counts, expected)


def test_top_p_one_is_plain_sampling_draw_for_draw():
    cfg = DiffusionConfig(scheduler="mdlm")
    model = FakeModel(torch.randn(6, 7, generator=torch.Generator().manual_seed(0)))
    a = sample(model, build_scheduler(cfg), num=4, seq_len=6, steps=8, diffusion_cfg=cfg, seed=21)
    b = sample(model, build_scheduler(cfg), num=4, seq_len=6, steps=8, diffusion_cfg=cfg, seed=21, top_p=1.0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.order, b.order)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            sample(model, build_scheduler(cfg), num=1, seq_len=6, steps=2, diffusion_cfg=cfg, top_p=bad)


# ----------------------------------------------------------------------------------------------
# tools/sample.py


def _load_tool():
    return load_tool("sample")


def test_template_parsing():
    tool = _load_tool()
    encode = lambda text: [ord(ch) for ch in text]                      # one id per character
    M, B = 1000, 7                                                      # mask id, BOS id
    # The BOS is given at position 0 (training rows are [BOS] chunk [EOS]); the text follows it.
    assert tool.given_ids(encode, M, 10, bos=B, infill="ab[MASK:2]c[MASK]") == [B, 97, 98, M, M, 99, M, M, M, M]
    assert tool.given_ids(encode, M, 5, bos=B, infill="[MASK]xy") == [B, M, 120, 121, M]
    assert tool.given_ids(encode, M, 4, bos=B, prefix="hi") == [B, 104, 105, M]
    assert tool.given_ids(encode, M, 4, bos=None, prefix="hi") == [104, 105, M, M]    # a tokenizer without BOS
    assert tool.given_ids(encode, M, 4, bos=B) is None
    for kwargs, word in (({"prefix": "hello"}, "only 4"), ({"prefix": "abc"}, "nothing left"),
                         ({"prefix": "abcd"}, "takes 5 positions with the BOS"),
                         ({"infill": "a[MASK:0]b"}, "at least one"), ({"prefix": ""}, "empty"),
                         # Checked before the span is built: no 10^11-entry list, no MemoryError.
                         ({"infill": "a[MASK:99999999999]"}, "takes 100000000001 positions")):
        with pytest.raises(ValueError, match=word):
            tool.given_ids(encode, M, 4, bos=B, **kwargs)


def test_order_png_marks_given_positions():
    from matplotlib.image import imread

    from lomdm_dist.train.order_png import GIVEN_COLOUR, write_order_png

    def has_given_colour(path) -> bool:
        pixels = imread(path)[:, :, :3]
        target = torch.tensor([int(GIVEN_COLOUR[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        return bool((torch.as_tensor(pixels) - target).abs().amax(-1).lt(0.02).any())

    order = torch.tensor([[-1, -1, 0, 3, 2, 1], [-1, 4, 4, 0, -1, 2]])
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        with_given, without = Path(tmp) / "a.png", Path(tmp) / "b.png"
        assert write_order_png(with_given, order, steps=4) == 2
        assert write_order_png(without, order.clamp(min=0), steps=4, max_samples=1) == 1
        assert with_given.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert has_given_colour(with_given) and not has_given_colour(without)


def test_tool_prefix_infill_top_p_and_order_png(tmp_path, capsys):
    tok = write_tiny_checkpoint(tmp_path / "run")
    tool = _load_tool()
    base = ["--ckpt", str(tmp_path / "run"), "--num", "3", "--steps", "6", "--seed", "4", "--device", "cpu"]

    prefix_file = tmp_path / "prefix.txt"
    prefix_file.write_text("Hello world\n")
    out, png = tmp_path / "p.jsonl", tmp_path / "order.png"
    assert tool.main(base + ["--out", str(out), "--prefix-file", str(prefix_file), "--top-p", "0.9",
                             "--order-png", str(png)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    head = tok.encode("Hello world")
    for rec in lines:
        assert rec["tokens"][0] == tok.bos and rec["tokens"][1:1 + len(head)] == head
        assert rec["order"][:1 + len(head)] == [-1] * (1 + len(head))
        assert all(0 <= o <= 6 for o in rec["order"][1 + len(head):])
        assert rec["provenance"]["prefix"] == "Hello world" and rec["provenance"]["infill"] is None
        assert rec["provenance"]["top_p"] == 0.9
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    template = "The cat[MASK:2] on the mat"
    assert tool.main(base + ["--out", str(out), "--infill", template]) == 0
    left, right = tok.encode("The cat"), tok.encode(" on the mat")
    for rec in (json.loads(line) for line in out.read_text().splitlines()):
        tokens, order = rec["tokens"], rec["order"]
        assert tokens[0] == tok.bos and tokens[1:1 + len(left)] == left
        assert tokens[1 + len(left) + 2:1 + len(left) + 2 + len(right)] == right
        given = [True] * (1 + len(left)) + [False] * 2 + [True] * len(right)
        given += [False] * (12 - len(given))
        assert [o == -1 for o in order] == given
        assert rec["provenance"]["infill"] == template and rec["provenance"]["top_p"] == 1.0
    assert "positions generated per sample" in capsys.readouterr().err

    for argv, word in ((["--prefix", "word " * 20], "only 12"), (["--top-p", "0"], "--top-p"),
                       (["--prefix", "a", "--infill", "b[MASK]"], "not allowed"),
                       (["--prefix-file", str(tmp_path / "none.txt")], "none.txt"),
                       (["--infill", "[MASK:99999999999]"], "only 12")):
        with pytest.raises(SystemExit) as exc:
            tool.main(base + ["--out", str(out)] + argv)
        assert exc.value.code == 2 and word in capsys.readouterr().err
