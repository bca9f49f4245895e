"""In-process tests of the distributed engine's pieces that need no process group: layout
validation, the split-up objective against ``diffusion_loss``, pipeline splitting, gradient
clipping, activation checkpointing and the checkpoint protocol."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist

from parallel_workers.parallel_common import BATCH, PAD_ID, SEED, batches, eval_batches, make_config, make_model  # noqa: E402
from tolerances import grad_scale  # noqa: E402
from lomdm_dist.config import ConfigError  # noqa: E402
from kernels.velocity_loss import velocity_loss  # noqa: E402
from lomdm_dist.diffusion.objective import CleanPass, StepSpec, diffusion_loss  # noqa: E402
from lomdm_dist.diffusion.schedulers import build_scheduler  # noqa: E402
from lomdm_dist.eval.perplexity import validation_nelbo  # noqa: E402
from lomdm_dist.parallel import ParallelConfig, build_mesh, clip_grad_norm_, grad_norm, validate_layout  # noqa: E402
from lomdm_dist.checkpoint.distributed import load_distributed_checkpoint, save_distributed_checkpoint  # noqa: E402
from lomdm_dist.parallel.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from lomdm_dist.parallel.pipeline import (PipelineHole, StageModule, keep_stage_parts, rank_stages,  # noqa: E402
                                          stage_blocks)
from lomdm_dist.checkpoint.protocol import CheckpointError, latest_checkpoint, verify_checkpoint  # noqa: E402
from lomdm_dist.train.ema import EMA  # noqa: E402
from lomdm_dist.train.optimizer import build_optimizer  # noqa: E402


# --- layout validation --------------------------------------------------------------------------

def test_good_layouts_pass():
    cfg = make_config()          # 4 layers, 4 heads, d 32, MLP 64, head MLP 16, batch 8, length 16
    for par, world in [(ParallelConfig(), 1), (ParallelConfig(tp=2, sequence_parallel=True), 2),
                       (ParallelConfig(tp=4, pp=2, microbatches=2), 8),
                       (ParallelConfig(pp=2, microbatches=2, pipeline_schedule="interleaved_1f1b", virtual_stages=2), 2),
                       (ParallelConfig(dp_replicate=2, dp_shard=2), 4)]:
        assert validate_layout(cfg, world, par) is par


@pytest.mark.parametrize("par, world, keys", [
    (ParallelConfig(tp=2), 4, ["parallel.pp", "parallel.dp_replicate", "parallel.dp_shard", "parallel.tp", "(4)"]),
    (ParallelConfig(tp=3), 3, ["parallel.tp (3)", "model.n_heads (4)"]),
    (ParallelConfig(tp=8), 8, ["parallel.tp (8)", "model.n_heads"]),
    (ParallelConfig(pp=3, microbatches=3), 3, ["parallel.pp (3)", "model.n_layers (4)"]),
    (ParallelConfig(dp_shard=3), 3, ["data.batch_size (8)", "parallel.dp_shard"]),
    (ParallelConfig(pp=2, microbatches=3), 2, ["data.batch_size (8)", "parallel.microbatches"]),
    (ParallelConfig(pp=2, microbatches=1), 2, ["parallel.microbatches (1)", "parallel.pp (2)"]),
    (ParallelConfig(virtual_stages=2), 1, ["parallel.virtual_stages", "interleaved_1f1b"]),
    (ParallelConfig(tp=0), 1, ["parallel.tp must be a positive integer"]),
    (ParallelConfig(activation_checkpointing="some"), 1, ["parallel.activation_checkpointing"]),
])
def test_bad_layouts_name_the_keys(par, world, keys):
    with pytest.raises(ConfigError) as err:
        validate_layout(make_config(), world, par)
    for key in keys:
        assert key in str(err.value)


def test_sequence_parallel_needs_divisible_length():
    cfg = make_config()
    cfg.data.seq_len = 15
    with pytest.raises(ConfigError, match=r"parallel.tp \(2\) to divide data.seq_len \(15\)"):
        validate_layout(cfg, 2, ParallelConfig(tp=2, sequence_parallel=True))


def test_bad_layout_fails_before_any_process_group():
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match="model.n_heads"):
        build_mesh(make_config(), 3, parallel=ParallelConfig(tp=3))
    assert not dist.is_initialized()


def test_dropout_seeds_follow_the_layout():
    from lomdm_dist.parallel import dropout_seed

    base = dict(dp_rank=0, pp_rank=0, tp_rank=0, sequence_parallel=False)
    seed = dropout_seed(7, **base)
    assert dropout_seed(7, **{**base, "tp_rank": 1}) == seed            # replicas drop alike
    assert dropout_seed(7, **{**base, "tp_rank": 1, "sequence_parallel": True}) != seed
    assert dropout_seed(7, **{**base, "dp_rank": 1}) != seed
    assert dropout_seed(7, **{**base, "pp_rank": 1}) != seed
    assert dropout_seed(8, **base) != seed


# --- the split-up objective equals diffusion_loss -------------------------------------------------

def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class MicrobatchedPasses:
    """The pipeline's passes in one process: unequal microbatches, the clean features stored detached
    and the phi head re-applied with grad per microbatch, each microbatch's loss back-propagated on
    its own (as a pipeline schedule does at its last stage)."""

    backpropagates = True
    reduce_sums = None
    token_loss = staticmethod(velocity_loss)

    def __init__(self, model, chunks: list[slice]):
        self.model, self.chunks = model, chunks

    def microbatches(self, rows):
        assert rows == self.chunks[-1].stop
        return self.chunks

    def clean_pass(self, x, sigma, to_exponents):
        backbone = self.model.backbone
        c = backbone.conditioning(x.shape[0], sigma)
        with torch.no_grad():
            h = backbone.features(x, c)
            k = to_exponents(self.model.phi(h, c).float())
        h, c = h.detach(), c.detach()
        return CleanPass(k=k, phi=lambda rows: self.model.phi(h[rows], c[rows]).float())

    def masked_pass(self, z, sigma, loss):
        backbone = self.model.backbone
        K = z.shape[0] // self.chunks[-1].stop
        for index, chunk in enumerate(self.chunks):
            copies = slice(K * chunk.start, K * chunk.stop)       # copy-major within the microbatch
            c = backbone.conditioning(K * (chunk.stop - chunk.start), sigma[copies])
            loss(index, backbone.features(z[copies], c), c).backward()

    def share(self, out):
        return out


def test_microbatched_last_stage_loss_equals_whole_batch():
    """What the last pipeline stage computes per microbatch (phi re-applied on stored, detached clean
    features) adds up to diffusion_loss on the whole batch, gradients included."""
    cfg = make_config("lomdm")
    x, valid = batches(1)[0]
    rows = torch.arange(BATCH)
    scheduler = build_scheduler(cfg.diffusion)
    ref_model, model = make_model(cfg), make_model(cfg)
    spec = StepSpec(seed=SEED, step=0, rows=rows, global_batch=BATCH)
    ref = diffusion_loss(ref_model, scheduler, x, spec, cfg=cfg.diffusion, valid=valid)
    ref.loss.backward()

    passes = MicrobatchedPasses(model, [slice(0, 3), slice(3, 8)])     # unequal microbatches on purpose
    out = diffusion_loss(model, scheduler, x, spec, cfg=cfg.diffusion, valid=valid, passes=passes)
    assert not out.loss.requires_grad                                  # back-propagated per microbatch
    # float32, other batch shapes and groupings: each token term comes from length-32 dot products and a
    # log-sum-exp over 61 logits; the loss and the statistics sum 8 x 16 token terms, a row 16; worst case
    # (terms + 61 + 32) * 2^-24 relative
    torch.testing.assert_close(out.loss.detach(), ref.loss.detach(), rtol=(128 + 61 + 32) * 2**-24, atol=1e-7)
    torch.testing.assert_close(out.row_nelbo, ref.row_nelbo, rtol=(16 + 61 + 32) * 2**-24, atol=1e-7)
    for key in ref.stats:
        torch.testing.assert_close(out.stats[key].float(), ref.stats[key].float(), rtol=(128 + 61 + 32) * 2**-24,
                                   atol=1e-6)
    ref_grads, grads = _grads(ref_model), _grads(model)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        # a gradient entry sums 128 token contributions back-propagated through 4 blocks (longest reduction
        # 64): (128 + 4 * 64) * 2^-24 of the contributions' size (grad_scale), worst case
        atol = (128 + 4 * 64) * 2**-24 * grad_scale(ref_grads, name)
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=atol, msg=name)


# --- pipeline split -------------------------------------------------------------------------------

def test_stage_assignment():
    assert [list(stage_blocks(8, 4, s)) for s in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rank_stages(1, 2, 2) == [1, 3]      # looped: the interleaved schedules' convention
    assert rank_stages(0, 4, 1) == [0]


@pytest.mark.parametrize("pp, virtual", [(2, 1), (2, 2), (4, 1)])
def test_stage_parts_partition_the_parameters_and_chain_to_the_full_forward(pp, virtual):
    cfg = make_config("lomdm")
    full = make_model(cfg)
    names = {n for n, _ in full.named_parameters()}
    num_stages = pp * virtual
    parts, seen = {}, set()
    for rank in range(pp):
        part = copy.deepcopy(full)
        keep_stage_parts(part, rank_stages(rank, pp, virtual), num_stages)
        own = {n for n, _ in part.named_parameters()}
        assert not own & seen, "two pipeline ranks hold the same parameter"
        seen |= own
        for stage in rank_stages(rank, pp, virtual):
            parts[stage] = StageModule(part, stage, num_stages)
    assert seen == names
    x, _ = batches(1)[0]
    sigma = torch.zeros(BATCH)
    with torch.no_grad():
        h, c = parts[0](x, sigma)
        for stage in range(1, num_stages):
            h, c = parts[stage](h, c)
        expected = full.backbone.features(x, full.backbone.conditioning(BATCH))
    torch.testing.assert_close(h, expected, rtol=0, atol=0)   # the same operations on the same tensors
    part = copy.deepcopy(full)
    keep_stage_parts(part, [1], 2)
    assert isinstance(part.backbone.blocks[0], PipelineHole) and part.backbone.embed is None
    with pytest.raises(ValueError, match="does not hold"):
        StageModule(part, 0, 2)


# --- gradient norm and clipping -------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clip_grad_norm_matches_torch_on_plain_parameters(max_norm):
    cfg = make_config("mdlm")
    x, valid = batches(1)[0]
    models = [make_model(cfg), make_model(cfg)]
    scheduler = build_scheduler(cfg.diffusion)
    for m in models:
        diffusion_loss(m, scheduler, x, StepSpec(seed=SEED, step=0, rows=torch.arange(BATCH), global_batch=BATCH),
                       cfg=cfg.diffusion, valid=valid).loss.backward()
    expected = torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm)
    # float32 sums of the N squared gradient entries in two groupings (per tensor, then across; per-tensor
    # norms, then their norm): sqrt(N) * 2^-24 typical; the clipped gradients inherit it through the factor
    rel = sum(p.numel() for p in models[0].parameters()) ** 0.5 * 2**-24
    assert grad_norm(models[1].parameters()).item() == pytest.approx(expected.item(), rel=rel)
    norm = clip_grad_norm_(models[1].parameters(), max_norm)
    assert norm.item() == pytest.approx(expected.item(), rel=rel)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=rel, atol=1e-9, msg=name)


# --- activation checkpointing ----------------------------------------------------------------------

@pytest.mark.parametrize("mode, recomputed", [("none", 0), ("selective", 2), ("full", 6)])
def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients(mode, recomputed):
    cfg = make_config("lomdm")
    x, valid = batches(1)[0]
    scheduler = build_scheduler(cfg.diffusion)
    ref_model, model = make_model(cfg), make_model(cfg)
    apply_activation_checkpointing(model, mode)
    calls = []
    blocks = [b for b in model.backbone.blocks] + [model.phi.block, model.psi.block]
    for block in blocks:
        block.attn.register_forward_pre_hook(lambda mod, args: calls.append(torch.is_grad_enabled()))
    spec = StepSpec(seed=SEED, step=0, rows=torch.arange(BATCH), global_batch=BATCH)
    diffusion_loss(ref_model, scheduler, x, spec, cfg=cfg.diffusion, valid=valid).loss.backward()
    out = diffusion_loss(model, scheduler, x, spec, cfg=cfg.diffusion, valid=valid)
    forward_calls = len(calls)
    out.loss.backward()
    # checkpointed blocks run their forward again during backward: 4 backbone blocks on the masked
    # pass (selective: blocks 0 and 2) and, for full, the phi and psi blocks too.
    assert len(calls) - forward_calls == recomputed
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref_model.named_parameters()]
    for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
        # recomputation repeats the same float32 operations on the same shapes (equal in practice); the
        # slack of 17 * 2^-24 only absorbs a kernel that blocks a recomputed buffer differently
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9, msg=name)


# --- checkpoints without a process group ----------------------------------------------------------

def test_distributed_checkpoint_round_trip_in_one_process(tmp_path):
    cfg = make_config("lomdm")
    model = make_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    ema = EMA(model, 0.9)
    scheduler = build_scheduler(cfg.diffusion)
    x, valid = batches(1)[0]
    diffusion_loss(model, scheduler, x, StepSpec(seed=SEED, step=0, rows=torch.arange(BATCH), global_batch=BATCH),
                   cfg=cfg.diffusion, valid=valid).loss.backward()
    optimizer.step()
    ema.update(model)
    run = tmp_path / "run"
    for step in (1, 2, 3):
        path = save_distributed_checkpoint(run, step, model=model, optimizer=optimizer, ema_shadow=ema.shadow,
                                           data_state={"position": step}, config_yaml="a: 1\n",
                                           trainer_state={"step": step, "ema_num_updates": ema.num_updates},
                                           meta={"vocab_size": model.vocab_size}, keep=2)
    assert latest_checkpoint(run) == path and path.name == "step-00000003"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    marker = json.loads((path / "COMPLETE").read_text())
    assert "data/dp0-of-1.pt" in marker["sha256"] and any(k.startswith("state/") for k in marker["sha256"])
    verify_checkpoint(path)

    fresh = make_model(cfg, seed=5)
    fresh_opt = build_optimizer(fresh, cfg.optim)
    fresh_ema = EMA(fresh, 0.9)
    loaded = load_distributed_checkpoint(run, model=fresh, optimizer=fresh_opt, ema_shadow=fresh_ema.shadow)
    assert loaded.step == 3 and loaded.data_state == {"position": 3} and loaded.config_yaml == "a: 1\n"
    assert loaded.trainer_state == {"step": 3, "ema_num_updates": 1}
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(ema.shadow[name], fresh_ema.shadow[name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], fresh_opt.state[q][key]), (name, key)
    val = validation_nelbo(model, scheduler, eval_batches(), cfg=cfg.diffusion, seed=SEED, pad_id=PAD_ID)
    val_fresh = validation_nelbo(fresh, scheduler, eval_batches(), cfg=cfg.diffusion, seed=SEED, pad_id=PAD_ID)
    assert val_fresh["val_nelbo"] == val["val_nelbo"]

    # a damaged shard is caught by the marker's hashes, an incomplete directory is never picked
    shard = next((path / "state").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_distributed_checkpoint(path, model=fresh)
    (run / "checkpoints" / ".tmp-step-00000009").mkdir()
    assert latest_checkpoint(run) == path


def test_loading_a_checkpoint_into_a_different_model_names_the_problem(tmp_path):
    cfg = make_config("lomdm")
    path = save_distributed_checkpoint(tmp_path, 1, model=make_model(cfg), config_yaml="", meta={})
    other = make_model(make_config("lomdm", n_layers=6))
    with pytest.raises(CheckpointError, match="does not match this model"):
        load_distributed_checkpoint(path, model=other)


def test_checkpoints_of_another_format_are_refused_with_a_clear_message(tmp_path):
    cfg = make_config("mdlm")
    model = make_model(cfg)
    path = save_distributed_checkpoint(tmp_path, 1, model=model, config_yaml="", meta={})
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format": "safetensors"}))
    with pytest.raises(CheckpointError, match="not a distributed"):
        load_distributed_checkpoint(path, model=model, verify=False)


# --- FLOPs for MFU --------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler_name", ["lomdm", "mdlm"])
def test_step_flops_match_torch_flop_counter(scheduler_name):
    """The closed form against PyTorch's own count of every matmul of a real step (SDPA forced to
    its math backend so that attention shows up as bmm)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from lomdm_dist.parallel.flops import step_flops

    cfg = make_config(scheduler_name)
    cfg.model.d_model, cfg.model.cond_dim = 64, 16
    model = make_model(cfg)
    x, valid = batches(1)[0]
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = diffusion_loss(model, build_scheduler(cfg.diffusion), x,
                             StepSpec(seed=SEED, step=0, rows=torch.arange(BATCH), global_batch=BATCH),
                             cfg=cfg.diffusion, valid=torch.ones_like(valid))
        out.loss.backward()
    m = cfg.model
    flops = step_flops(n_layers=m.n_layers, d_model=m.d_model, mlp_ratio=m.mlp_ratio, cond_dim=m.cond_dim,
                       head_hidden=m.head_mlp_hidden or m.d_model, vocab_size=model.vocab_size, seq_len=x.shape[1],
                       rows=BATCH, num_masks=cfg.diffusion.resolved_masks_per_row(),
                       learned=scheduler_name == "lomdm", masked_fraction=out.stats["masked_fraction"].item())
    # the closed form counts a backward as twice the forward everywhere; autograd skips the input
    # gradient of the few layers whose input needs none (the sinusoid, detached conditionings)
    assert flops.total == pytest.approx(counter.get_total_flops(), rel=5e-3)
    assert (flops.clean_pass == 0) == (scheduler_name != "lomdm")


def test_async_checkpoint_is_a_snapshot_and_completes_on_finish(tmp_path):
    cfg = make_config("mdlm")
    model = make_model(cfg)
    expected = [p.detach().clone() for p in model.parameters()]
    pending = save_distributed_checkpoint(tmp_path, 5, model=model, config_yaml="", meta={}, async_save=True)
    with torch.no_grad():                 # training goes on while the checkpoint is written
        for p in model.parameters():
            p.add_(1.0)
    path = pending.finish()
    assert latest_checkpoint(tmp_path) == path
    restored = make_model(cfg, seed=9)
    load_distributed_checkpoint(path, model=restored)
    for want, got in zip(expected, restored.parameters()):
        assert torch.equal(want, got)


# --- evaluation split over ranks -------------------------------------------------------------------

def test_validation_split_over_ranks_pads_a_ragged_batch_and_sums_to_one_process():
    """Two simulated data-parallel ranks over a batch of 7 rows (padded to 8 with invalid rows):
    their summed totals give exactly the one-process NELBO."""
    from lomdm_dist.eval.perplexity import BatchSplit

    cfg = make_config("lomdm")
    model = make_model(cfg)
    scheduler = build_scheduler(cfg.diffusion)
    batches = [eval_batches()[0], eval_batches()[1][:7]]
    whole = validation_nelbo(model, scheduler, batches, cfg=cfg.diffusion, seed=SEED, pad_id=PAD_ID)
    totals = []
    for rank in range(2):
        split = BatchSplit(rows=lambda n, r=rank: torch.arange(r * n // 2, (r + 1) * n // 2), multiple=2,
                           reduce=lambda t: totals.append(t.clone()) or t)
        validation_nelbo(model, scheduler, batches, cfg=cfg.diffusion, seed=SEED, pad_id=PAD_ID, split=split)
    nelbo, l_main, l_velocity, tokens = (totals[0] + totals[1]).tolist()[:4]
    assert tokens == whole["val_tokens"] == (8 * 16 - 5) + (7 * 16 - 5)   # row 2 of each batch ends in padding
    # float32 per-row NELBOs (16 token terms, each from length-32 dot products and a log-sum-exp over 61
    # logits) computed on batches of 4 rows instead of 8 and summed per batch in float32 over 4 rows
    # instead of 8: worst case (8 + 16 + 61 + 32) * 2^-24; L_main and L_velocity are float32 sums over a
    # batch's 128 tokens, grouped otherwise than the rows: (128 + 61 + 32) * 2^-24
    assert nelbo / tokens == pytest.approx(whole["val_nelbo"], rel=(8 + 16 + 61 + 32) * 2**-24)
    assert (l_main + l_velocity) / tokens == pytest.approx(whole["val_nelbo"], rel=(128 + 61 + 32) * 2**-24)


# --- process environment ---------------------------------------------------------------------------

def test_process_environment_is_read_and_checked():
    from lomdm_dist.config import load_config
    from lomdm_dist.parallel.runtime import ProcessEnv

    assert ProcessEnv.from_environ({}) == ProcessEnv(0, 1, 0, 1)
    env = ProcessEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                   "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert env == ProcessEnv(3, 4, 1, 2) and env.distributed
    with pytest.raises(ConfigError, match="RANK \\(4\\) and WORLD_SIZE \\(4\\)"):
        ProcessEnv.from_environ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        ProcessEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(ConfigError, match="WORLD_SIZE must be an integer"):
        ProcessEnv.from_environ({"WORLD_SIZE": "two"})
    assert load_config(None, ["parallel.collective_timeout_s=30"]).parallel.collective_timeout_s == 30.0
    with pytest.raises(ConfigError, match="parallel.collective_timeout_s must be positive"):
        load_config(None, ["parallel.collective_timeout_s=-1"])


def test_peak_flops_come_from_the_table_only_for_known_gpus_in_bf16():
    from lomdm_dist.parallel.flops import PEAK_FLOPS, device_peak_flops

    assert device_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == PEAK_FLOPS["h100-sxm-bf16"]
    assert device_peak_flops("NVIDIA H100 PCIe", "bf16") == PEAK_FLOPS["h100-pcie-bf16"]
    assert device_peak_flops("NVIDIA H200", "bf16") == PEAK_FLOPS["h200-bf16"]
    assert device_peak_flops("NVIDIA H100 80GB HBM3", None) is None       # fp32: no honest peak
    assert device_peak_flops(None, "bf16") is None and device_peak_flops("Tesla T4", "bf16") is None
