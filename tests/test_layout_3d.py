"""The 3-D layouts of the 8B config at toy size on 8 gloo ranks, against one process.

One spawn runs both layouts in one process group (``parallel_workers/meta_init.run_layout_3d``):
A = tp 2 x pp 2 x dp_shard 2 and B = HSDP dp_replicate 2 x dp_shard 2 x tp 2, each from a model
built on the meta device and materialised shard by shard. Checked: the materialised weights equal
``build_model`` with the same seed bit for bit; step-0 losses, gradients and gradient norms equal
one process; A's checkpoint (after step 0) resumes in B and in one process with the saved weights
and EMA bit for bit, and step 1 after the resume equals step 1 of the uninterrupted one-process run.

Tolerances (fp32, dropout 0) follow ``test_parallel_dist.py`` for this 2-block model: a loss sums
B * L = 128 token terms, each from length-32 dot products and a log-sum-exp over 61 logits, all
regrouped by a layout: (128 + 61 + 32) * 2^-24 relative. A gradient entry sums 128 token
contributions back-propagated through 2 blocks (longest reduction 64): (128 + 2 * 64) * 2^-24 of
the contributions' size (``tolerances.grad_scale``); the gradient norm adds sqrt(N) * 2^-24 for its
N squared entries.
"""

from __future__ import annotations


import pytest
import torch

from dist_utils import run_workers  # noqa: E402
from parallel_workers.parallel_common import (BATCH, INIT_SEED, N_LAYERS, PERTURB_SEED, SAVE_AT, SEED, VOCAB,  # noqa: E402
                                              batches, make_config, perturb_plan)
from tolerances import grad_scale  # noqa: E402
from lomdm_dist.checkpoint.distributed import load_distributed_checkpoint  # noqa: E402
from lomdm_dist.diffusion.objective import StepSpec, diffusion_loss  # noqa: E402
from lomdm_dist.diffusion.schedulers import build_scheduler  # noqa: E402
from lomdm_dist.model import build_model, init_parameters_  # noqa: E402
from lomdm_dist.train.ema import EMA  # noqa: E402
from lomdm_dist.train.optimizer import build_optimizer, set_learning_rate  # noqa: E402

pytestmark = pytest.mark.dist

REL_LOSS = (128 + 61 + 32) * 2**-24
REL_GRAD = (128 + N_LAYERS * 64) * 2**-24


def one_process_model(cfg, seed: int = INIT_SEED) -> torch.nn.Module:
    model = build_model(cfg.model, cfg.diffusion, VOCAB, seed=seed)
    init_parameters_(model, PERTURB_SEED, perturb_plan(model))
    return model


def one_process_steps(cfg, model, optimizer, ema, steps: range, record: dict) -> None:
    scheduler = build_scheduler(cfg.diffusion)
    data = batches(steps.stop)
    for step in steps:
        x, valid = data[step]
        set_learning_rate(optimizer, step, cfg.optim.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        spec = StepSpec(seed=SEED, step=step, rows=torch.arange(BATCH), global_batch=BATCH)
        out = diffusion_loss(model, scheduler, x, spec, cfg=cfg.diffusion, valid=valid)
        out.loss.backward()
        if "grads" not in record:
            record["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        record.setdefault("grad_norms", []).append(
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip).item())
        optimizer.step()
        ema.update(model)
        record.setdefault("losses", []).append(out.loss.item())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("layout3d")
    cfg = make_config("lomdm", n_layers=N_LAYERS)
    initial = {n: p.detach().clone() for n, p in build_model(cfg.model, cfg.diffusion, VOCAB,
                                                                  seed=INIT_SEED).named_parameters()}
    model = one_process_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    reference: dict = {"initial": initial}
    one_process_steps(cfg, model, optimizer, EMA(model, 0.9), range(0, SAVE_AT + 1), reference)
    results = run_workers("worker.py", 8, base / "out", f"layout3d={base / 'ckpt'}", timeout=400.0)
    return cfg, reference, [r["layout3d"] for r in results]


def _union(results: list[dict], layout: str, key: str) -> dict[str, torch.Tensor]:
    """The full tensors of ``key`` over the ranks (pipeline stages hold different parameters); the
    ranks that hold a parameter must agree exactly."""
    merged: dict[str, torch.Tensor] = {}
    for rank, result in enumerate(results):
        for name, value in result[layout][key].items():
            if name in merged:
                assert torch.equal(merged[name], value), f"{layout} rank {rank}: {key} {name} differs between ranks"
            merged[name] = value
    return merged


@pytest.mark.parametrize("layout", ["A", "B"])
def test_meta_init_equals_one_process_build(runs, layout):
    _, reference, results = runs
    init = _union(results, layout, "init")
    assert init.keys() == reference["initial"].keys()
    for name, value in init.items():
        assert torch.equal(value, reference["initial"][name]), name


@pytest.mark.parametrize("layout", ["A", "B"])
def test_step_zero_equals_one_process(runs, layout):
    _, reference, results = runs
    n_params = sum(g.numel() for g in reference["grads"].values())
    rel_norm = REL_GRAD + n_params ** 0.5 * 2**-24
    for rank, result in enumerate(results):
        got = result[layout]
        assert got["losses"][0] == pytest.approx(reference["losses"][0], rel=REL_LOSS), rank
        assert got["grad_norms"][0] == pytest.approx(reference["grad_norms"][0], rel=rel_norm), rank
    grads = _union(results, layout, "grads")
    assert grads.keys() == reference["grads"].keys()
    for name, grad in grads.items():
        expected = reference["grads"][name]
        assert expected.abs().max() > 0, f"{name}: zero reference gradient checks nothing"
        bound = REL_GRAD * grad_scale(reference["grads"], name)
        error = (grad - expected).abs().max().item()
        assert error <= bound, f"{layout}: gradient of {name} off by {error:.3g} (bound {bound:.3g})"


def test_checkpoint_of_3d_layout_resumes_in_hsdp_layout(runs):
    _, reference, results = runs
    saved, saved_ema = _union(results, "A", "saved_params"), _union(results, "A", "saved_ema")
    loaded, loaded_ema = _union(results, "B", "loaded_params"), _union(results, "B", "loaded_ema")
    assert loaded.keys() == saved.keys() == loaded_ema.keys()
    for name in saved:
        assert torch.equal(loaded[name], saved[name]), name
        assert torch.equal(loaded_ema[name], saved_ema[name]), f"EMA of {name}"
    for rank, result in enumerate(results):
        assert result["B"]["loaded_step"] == SAVE_AT
        # the uninterrupted run's step SAVE_AT (rounding-level differences in step 0's update
        # included, as in test_parallel_dist's multi-step losses)
        assert result["B"]["loss_after_load"] == pytest.approx(reference["losses"][SAVE_AT], rel=REL_LOSS), rank


def test_checkpoint_of_3d_layout_resumes_in_one_process(runs):
    cfg, _, results = runs
    model = one_process_model(cfg, seed=INIT_SEED + 100)     # other weights: the load must replace them all
    optimizer = build_optimizer(model, cfg.optim)
    ema = EMA(model, 0.9)
    loaded = load_distributed_checkpoint(results[0]["A"]["saved_path"], model=model, optimizer=optimizer,
                                         ema_shadow=ema.shadow)
    assert loaded.step == SAVE_AT
    ema.num_updates = loaded.step
    saved, saved_ema = _union(results, "A", "saved_params"), _union(results, "A", "saved_ema")
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), saved[name]), name
        assert torch.equal(ema.shadow[name], saved_ema[name]), f"EMA of {name}"
    record: dict = {}
    one_process_steps(cfg, model, optimizer, ema, range(SAVE_AT, SAVE_AT + 1), record)
    assert record["losses"][0] == pytest.approx(results[0]["B"]["loss_after_load"], rel=REL_LOSS)
