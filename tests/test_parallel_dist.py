"""Multi-process (gloo) tests of the distributed engine: every layout against one process.

Two spawns serve all checks (starting processes costs more than the toy steps): 2 ranks for
TP=2 (with and without sequence parallelism, with activation checkpointing), FSDP dp_shard=2,
DDP-style dp_replicate=2, PP=2 (1F1B, GPipe, interleaved 1F1B), and 4 ranks for TP=2 x PP=2,
TP=2 x FSDP=2 and the DCP checkpoints saved in one layout and loaded in another.

The reference is ``diffusion_loss`` on one full model over the whole global batch, computed in
every worker without any process group, with ``torch.nn.utils.clip_grad_norm_`` and the trainer's
AdamW and EMA. Tolerances (fp32, dropout 0) come from the float32 sums a layout regroups (see the
constants): losses (128 + 61 + 32) * 2^-24 relative; each gradient tensor max|g - g_ref| <=
(128 + 4 * 64) * 2^-24 of its contributions' size (``tolerances.grad_scale``); gradient norms that
plus sqrt(N) * 2^-24; parameters and EMA after the updates 3e-4 absolute (Adam turns
rounding-level gradient differences on near-zero entries into steps of up to lr = 3e-3, a wrong
gradient would move them by that much on every entry).
"""

from __future__ import annotations

import pytest
import torch

from parallel_workers.parallel_common import PAD_ID, SEED, eval_batches, make_config, make_model, single_process_steps  # noqa: E402
from dist_utils import run_workers  # noqa: E402
from tolerances import grad_scale  # noqa: E402
from lomdm_dist.diffusion.schedulers import build_scheduler  # noqa: E402
from lomdm_dist.eval.perplexity import validation_nelbo  # noqa: E402
from lomdm_dist.checkpoint.distributed import load_distributed_checkpoint, save_distributed_checkpoint  # noqa: E402
from lomdm_dist.train.ema import EMA  # noqa: E402
from lomdm_dist.train.optimizer import build_optimizer  # noqa: E402

pytestmark = pytest.mark.dist

# LAYOUT-SCHEDULER[-STEPS]: five updates by default, one where a step-0 check is enough. The four
# layouts the engine must get right (TP=2, PP=2, FSDP dp_shard=2, TP=2 x PP=2) run every scheduler family.
FAMILIES = ["lomdm", "mdlm", "poly", "arm", "block"]
TWO_RANKS = ([f"{layout}-{family}" for layout in ("tp2", "pp2", "fsdp2") for family in FAMILIES]
             + ["tp2sp-lomdm", "tp2sp-mdlm", "ddp2-lomdm-1", "pp2gpipe-mdlm-1", "pp2i-lomdm-1", "tp2ac-lomdm-1",
                "pp2ac-lomdm-1"])
FOUR_RANKS = [f"tp2pp2-{family}" for family in FAMILIES] + ["tp2pp2sp-lomdm-1", "tp2fsdp2-lomdm-1",
                                                             "pp2fsdp2-lomdm-1"]

# A loss or NELBO sums B * L = 128 float32 token terms, each from length-32 dot products and a
# log-sum-exp over 61 logits; a layout regroups all of them: worst case (128 + 61 + 32) * 2^-24.
REL_LOSS = (128 + 61 + 32) * 2**-24
# A gradient entry sums 128 token contributions back-propagated through 4 blocks (longest reduction
# 64): worst case (128 + 4 * 64) * 2^-24 of the contributions' size.
REL_GRAD = (128 + 4 * 64) * 2**-24
# The gradient norm adds the sum of the N <= 80,319 squared entries, regrouped: sqrt(N) * 2^-24 typical.
REL_NORM = REL_GRAD + 80_319 ** 0.5 * 2**-24
# A validation NELBO: float32 rows of 16 token terms, summed in float32 over a batch of 8 rows.
REL_VAL = (8 + 16 + 61 + 32) * 2**-24
# Parameters after the AdamW updates: Adam divides by the gradient's own size, so an entry whose
# gradient is rounding-level moves by up to lr = 3e-3 a step whatever its rounding (module docstring).
ABS_PARAM = 3e-4


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return run_workers("worker.py", 2, tmp_path_factory.mktemp("two_ranks"), *(f"layout={n}" for n in TWO_RANKS),
                       "dropout=tp2", "dropout=tp2sp")


@pytest.fixture(scope="module")
def four_rank_results(tmp_path_factory):
    """The 4-rank spawn, plus a one-process checkpoint for it to load and the one-process numbers
    to compare its checkpoint task with."""
    base = tmp_path_factory.mktemp("four_ranks")
    cfg = make_config("lomdm")
    model = make_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    ema = EMA(model, 0.9)
    single_process_steps(cfg, model, optimizer, ema, range(0, 2))
    source = save_distributed_checkpoint(base / "single", 2, model=model, optimizer=optimizer, ema_shadow=ema.shadow,
                                         data_state={"position": 2}, config_yaml="", meta={})
    scheduler = build_scheduler(cfg.diffusion)
    expected = {"val": _val(model, scheduler, cfg), "val_ema": _val(model, scheduler, cfg, ema),
                "losses_after_load": single_process_steps(cfg, model, optimizer, ema, range(2, 4))}
    results = run_workers("worker.py", 4, base / "out", *(f"layout={n}" for n in FOUR_RANKS),
                          f"checkpoint={source},{base / 'sharded'}")
    return results, expected


def _val(model, scheduler, cfg, ema=None) -> float:
    def run():
        return validation_nelbo(model, scheduler, eval_batches(), cfg=cfg.diffusion, seed=SEED,
                                pad_id=PAD_ID)["val_nelbo"]
    if ema is None:
        return run()
    with ema.swapped_in(model):
        return run()


def check_layout(results: list[dict], name: str) -> None:
    """Every rank's numbers against the reference; the ranks' parameters together cover the model."""
    covered = set()
    for rank, result in enumerate(results):
        ref, par = result[name]["reference"], result[name]["parallel"]
        where = f"{name}, rank {rank}"
        assert par["losses"] == pytest.approx(ref["losses"], rel=REL_LOSS), where
        assert par["nelbo"] == pytest.approx(ref["nelbo"], rel=REL_LOSS), where
        assert par["grad_norms"] == pytest.approx(ref["grad_norms"], rel=REL_NORM), where
        assert par["logged_stats"].keys() == ref["stats"].keys(), where
        for key, value in par["logged_stats"].items():
            assert value == pytest.approx(ref["stats"][key], rel=REL_LOSS, abs=1e-6), (where, key)  # token means
        rows = par["rows"]
        torch.testing.assert_close(par["row_nelbo"], ref["row_nelbo"][rows], rtol=(16 + 61 + 32) * 2**-24, atol=1e-6,
                                   msg=where)      # a row: 16 token terms
        for pname, grad in par["grads"].items():
            expected = ref["grads"][pname]
            bound = REL_GRAD * grad_scale(ref["grads"], pname)
            error = (grad - expected).abs().max().item()
            assert error <= bound, f"{where}: gradient of {pname} off by {error:.3g} (bound {bound:.3g})"
            torch.testing.assert_close(par["params"][pname], ref["params"][pname], rtol=0, atol=ABS_PARAM,
                                       msg=f"{where}: {pname}")
            torch.testing.assert_close(par["ema"][pname], ref["ema"][pname], rtol=0, atol=ABS_PARAM,
                                       msg=f"{where}: EMA of {pname}")
        covered |= par["grads"].keys()
    assert covered == set(results[0][name]["reference"]["grads"]), f"{name}: parameters missing on every rank"


@pytest.mark.parametrize("name", TWO_RANKS)
def test_two_rank_layout_equals_one_process(two_rank_results, name):
    check_layout(two_rank_results, name)


@pytest.mark.parametrize("name", FOUR_RANKS)
def test_four_rank_layout_equals_one_process(four_rank_results, name):
    check_layout(four_rank_results[0], name)


@pytest.mark.parametrize("scheduler", ["lomdm", "mdlm"])
def test_sequence_parallel_on_and_off_give_the_same_numbers(two_rank_results, scheduler):
    on, off = two_rank_results[0][f"tp2sp-{scheduler}"]["parallel"], two_rank_results[0][f"tp2-{scheduler}"]["parallel"]
    assert on["losses"] == pytest.approx(off["losses"], rel=REL_LOSS)
    for pname, grad in off["grads"].items():
        torch.testing.assert_close(on["grads"][pname], grad, rtol=0, atol=REL_GRAD * grad_scale(off["grads"], pname))


@pytest.mark.parametrize("layout", ["tp2", "tp2sp"])
def test_dropout_keeps_tensor_parallel_replicas_in_step(two_rank_results, layout):
    """With dropout on, the tensor-parallel peers must drop the same elements of replicated
    activations (else their copies of the residual stream drift apart) and, under sequence
    parallelism, draw their own masks for their own positions."""
    first, second = (r[f"dropout-{layout}"] for r in two_rank_results)
    assert first["loss"] != pytest.approx(first["reference"], rel=1e-3), "dropout had no effect"
    # tensor-parallel peers hold the same all-reduced values: equal in practice, 1e-6 = 17 * 2^-24 of slack
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-6)
    torch.testing.assert_close(first["norm_grad"], second["norm_grad"], rtol=1e-6, atol=1e-9)
    assert (first["seed"] == second["seed"]) == (layout == "tp2")


def test_checkpoint_from_one_process_loads_into_tp2_pp2(four_rank_results):
    results, expected = four_rank_results
    for rank, result in enumerate(results):
        ck = result["checkpoint"]
        assert ck["loaded_step"] == 2 and ck["loaded_data_state"] == {"position": 2}, rank
        assert ck["val_loaded"] == pytest.approx(expected["val"], rel=REL_VAL), rank
        assert ck["val_loaded_ema"] == pytest.approx(expected["val_ema"], rel=REL_VAL), rank
        # the optimizer state was resharded too: training goes on exactly as in one process
        assert ck["losses_after_load"] == pytest.approx(expected["losses_after_load"], rel=REL_LOSS), rank


def test_checkpoint_from_tp2_pp2_loads_into_one_process(four_rank_results):
    results, _ = four_rank_results
    ck = results[0]["checkpoint"]
    cfg = make_config("lomdm")
    model = make_model(cfg, seed=42)
    optimizer = build_optimizer(model, cfg.optim)
    ema = EMA(model, 0.9)
    loaded = load_distributed_checkpoint(ck["saved_path"], model=model, optimizer=optimizer, ema_shadow=ema.shadow)
    assert loaded.step == ck["saved_step"] == 4
    assert loaded.meta["layout"] == {"world_size": 4, "tp": 2, "pp": 2, "dp_replicate": 1, "dp_shard": 1}
    assert loaded.data_state == {"dp_rank": 0, "position": 104}
    scheduler = build_scheduler(cfg.diffusion)
    assert _val(model, scheduler, cfg) == pytest.approx(ck["val_saved"], rel=REL_VAL)
    assert _val(model, scheduler, cfg, ema) == pytest.approx(ck["val_saved_ema"], rel=REL_VAL)
    ema.num_updates = loaded.step
    loss = single_process_steps(cfg, model, optimizer, ema, range(4, 5))[0]
    assert loss == pytest.approx(ck["loss_after_save"], rel=REL_LOSS)


def test_no_collective_is_left_unwaited(two_rank_results, four_rank_results):
    """Every functional collective a step starts is waited on (an AsyncCollectiveTensor that is only
    inspected for its dtype, for instance, would leave its all-reduce pending until exit)."""
    for results in (*two_rank_results, *four_rank_results[0]):
        assert results["pending_collectives"] == 0
