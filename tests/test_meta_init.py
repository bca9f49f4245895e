"""Initialisation by (seed, parameter name), and the meta-device build materialised shard by shard.

In one process: the meta build materialised by ``parallelize_model`` equals ``build_model`` with the
same seed; a parameter's values depend on the seed and its name only (not on what else the model
holds, nor on construction order); any rectangle of a parameter filled on its own equals that
rectangle of the whole; the distributions are the documented ones. On 2 gloo ranks: after the
meta build in TP (with and without sequence parallelism), FSDP, DDP-style replication and PP,
the gathered parameters equal the one-process ``build_model`` bit for bit (the same float32 draws
are copied, nothing is computed, so equality is exact).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_utils import run_workers  # noqa: E402
from lomdm_dist.config import DiffusionConfig, ModelConfig  # noqa: E402
from lomdm_dist.model import ParamInit, build_model, fill_shard_, init_parameters_, init_plan  # noqa: E402
from lomdm_dist.model import init as init_module  # noqa: E402
from lomdm_dist.parallel import parallelize_model  # noqa: E402
from lomdm_dist.parallel.config import ParallelConfig  # noqa: E402

VOCAB = 61
MODEL = ModelConfig(n_layers=2, d_model=32, n_heads=4, cond_dim=16, mlp_ratio=2, dropout=0.0, head_mlp_hidden=16)
LOMDM = DiffusionConfig(scheduler="lomdm")
TWO_RANK_LAYOUTS = ["tp2", "tp2sp", "fsdp2", "ddp2", "pp2"]


def eager(seed: int, model_cfg: ModelConfig = MODEL, diffusion: DiffusionConfig = LOMDM) -> nn.Module:
    return build_model(model_cfg, diffusion, VOCAB, seed=seed)


def meta(model_cfg: ModelConfig = MODEL, diffusion: DiffusionConfig = LOMDM) -> nn.Module:
    with torch.device("meta"):
        return build_model(model_cfg, diffusion, VOCAB, seed=0)


def test_meta_build_materialised_equals_eager_build():
    reference = dict(eager(5).named_parameters())
    pm = parallelize_model(meta(), None, ParallelConfig(), init_seed=5)
    got = dict(pm.named_parameters())
    assert got.keys() == reference.keys()
    for name, param in got.items():
        assert not param.is_meta and torch.equal(param, reference[name]), name
    other = dict(eager(6).named_parameters())
    assert not torch.equal(other["backbone.embed.weight"], reference["backbone.embed.weight"])


def test_values_depend_only_on_seed_and_name():
    """A deeper model, a model without the scheduler heads and one built after other draws from
    torch's generator hold the same values under the same names."""
    base = dict(eager(3).named_parameters())
    torch.manual_seed(123)
    torch.rand(1000)
    deeper = dict(eager(3, ModelConfig(**{**MODEL.__dict__, "n_layers": 4})).named_parameters())
    no_heads = dict(eager(3, diffusion=DiffusionConfig(scheduler="mdlm")).named_parameters())
    for other in (deeper, no_heads):
        shared = base.keys() & other.keys()
        assert any(n.startswith("backbone.blocks.") for n in shared)
        for name in shared:
            assert torch.equal(base[name], other[name]), name
    assert "backbone.blocks.3.attn.q_proj.weight" in deeper and "phi.proj.weight" not in no_heads
    # two parameters of one shape under different names draw different values
    assert not torch.equal(base["backbone.blocks.0.attn.q_proj.weight"], base["backbone.blocks.0.attn.k_proj.weight"])
    assert not torch.equal(base["phi.proj.weight"], base["psi.proj.weight"])


def test_seed_none_draws_from_torch_generator():
    torch.manual_seed(9)
    a = build_model(MODEL, LOMDM, VOCAB)
    torch.manual_seed(9)
    b = build_model(MODEL, LOMDM, VOCAB)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("shape", [(37, 5), (37,), (6, 7, 3)])
def test_any_rectangle_equals_that_rectangle_of_the_whole(monkeypatch, shape):
    """With blocks of a few rows, shards that start and end inside blocks still get the whole's values."""
    monkeypatch.setattr(init_module, "BLOCK_ELEMENTS", 16)   # rows per block: 3, 16, 1
    spec = ParamInit("uniform", 0.7)
    whole = fill_shard_(torch.empty(shape), spec, seed=4, name="w", global_shape=shape)
    assert len(torch.unique(whole)) == whole.numel()            # no block repeated another's stream
    rectangles = [((1,) + (0,) * (len(shape) - 1), (35,) + shape[1:])] if shape[0] == 37 else []
    rectangles += [((2,) + (1,) * (len(shape) - 1), (3,) + tuple(max(1, s - 2) for s in shape[1:])),
                   ((shape[0] - 1,) + (0,) * (len(shape) - 1), (1,) + shape[1:]),
                   ((0,) * len(shape), shape)]
    for offset, size in rectangles:
        part = fill_shard_(torch.empty(size), spec, seed=4, name="w", global_shape=shape, offset=offset)
        expected = whole[tuple(slice(o, o + s) for o, s in zip(offset, size))]
        assert torch.equal(part, expected), (offset, size)
    with pytest.raises(ValueError, match="outside"):
        fill_shard_(torch.empty(2, *shape[1:]), spec, seed=4, name="w", global_shape=shape, offset=(shape[0] - 1,)
                    + (0,) * (len(shape) - 1))


def test_distributions_follow_the_modules():
    model = eager(0)
    plan = init_plan(model)
    params = dict(model.named_parameters())
    zero = {n for n, s in plan.items() if s.kind == "zeros"}
    assert zero == {n for n in params if ".modulation." in n or n.startswith("backbone.final.linear.")
                    or n in ("phi.out.weight", "psi.out.weight")}
    for name in zero:
        assert torch.equal(params[name], torch.zeros_like(params[name])), name
    for name, param in params.items():
        if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name:
            assert plan[name].kind == "ones" and torch.equal(param, torch.ones_like(param)), name
    # MDLM's embedding: kaiming_uniform_(a=sqrt(5)) on (V, d) is uniform in +-1/sqrt(d)
    assert plan["backbone.embed.weight"].bound == pytest.approx(1 / math.sqrt(MODEL.d_model))
    # PyTorch's Linear default: weight and bias uniform in +-1/sqrt(fan_in)
    assert plan["backbone.blocks.0.mlp.fc2.bias"].bound == pytest.approx(1 / math.sqrt(2 * MODEL.d_model))
    assert plan["backbone.sigma_map.mlp.0.weight"].bound == pytest.approx(1 / math.sqrt(256))
    for name, spec in plan.items():
        if spec.kind == "uniform":
            values = params[name]
            assert values.abs().max() < spec.bound, name
            if values.numel() >= 512:
                # n uniform draws: the max is within a few 1/n of the bound, the mean within
                # 5 standard errors bound / sqrt(3n) of zero
                n = values.numel()
                assert values.abs().max() > spec.bound * (1 - 10 / n), name
                assert abs(values.mean().item()) < 5 * spec.bound / math.sqrt(3 * n), name


def test_unknown_parameter_and_misuse_are_named():
    model = eager(0)
    model.backbone.extra = nn.Module()
    model.backbone.extra.scale = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="backbone.extra.scale"):
        init_plan(model)
    with pytest.raises(ValueError, match="init_seed"):
        parallelize_model(meta(), None, ParallelConfig())
    with pytest.raises(ValueError, match="init_seed"):
        parallelize_model(eager(0), None, ParallelConfig(), init_seed=0)
    with pytest.raises(ValueError, match="meta device"):
        init_parameters_(meta(), 0)


@pytest.mark.dist
def test_meta_build_in_two_rank_layouts_equals_one_process(tmp_path):
    from parallel_workers.parallel_common import INIT_SEED, make_config

    cfg = make_config("lomdm")
    reference = dict(build_model(cfg.model, cfg.diffusion, VOCAB, seed=INIT_SEED).named_parameters())
    results = run_workers("worker.py", 2, tmp_path, *(f"meta={name}" for name in TWO_RANK_LAYOUTS))
    for layout in TWO_RANK_LAYOUTS:
        covered = set()
        for rank, result in enumerate(results):
            params = result[f"meta-{layout}"]["params"]
            for name, value in params.items():
                assert torch.equal(value, reference[name].detach()), f"{layout}, rank {rank}: {name}"
            covered |= params.keys()
        assert covered == reference.keys(), f"{layout}: parameters held by no rank"
