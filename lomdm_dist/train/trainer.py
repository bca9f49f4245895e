"""The training loop: one code path for one process or N processes in any layout.

Set-up, on every rank: torchrun's environment says who this process is; the layout is validated
against the world size *before* any process group starts (a bad layout is a config error naming
the keys); the process group starts (gloo on CPU, NCCL on GPU, collective timeout from
``parallel.collective_timeout_s``); the model is built on the meta device, laid out on the mesh and
only then materialised (``parallelize_model``: each rank allocates and initialises its own shard
from ``train.seed`` and the parameter names, the values one process would have); dropout
is seeded per rank; AdamW and the EMA hold this rank's part; the newest complete checkpoint is
loaded, whatever layout wrote it. One process is the same code with ``mesh = None``.

Per step: this rank's rows of the global batch -> ``forward_backward`` (three passes for LoMDM,
the two-phase pipeline step under pipeline parallelism) -> non-finite check that every rank
shares -> global grad-norm clip -> AdamW -> EMA. Evaluation (every rank, on global validation
batches), sample text and priority images (rank 0, from weights gathered there) and checkpoints
(Distributed Checkpoint, every rank) run on schedule. SIGTERM / SIGUSR1 make every rank save at
the same step boundary and return.

Console: everything goes to stderr (the progress bars' stream). Mid-run, the bar's label names the
phase between steps (``train [evaluation]``); after the last step the bar is closed and each phase
prints a line of its own (evaluation, with a bar over the validation batches; sampling; writing the
checkpoint), since together they take long enough to look like a hang. The run ends with a summary:
steps, wall time per phase, final validation numbers and where the checkpoint, samples, metrics
and TensorBoard events are.

On resume the config is compared with the one the checkpoint was written under
(``config_history``): ordinary changes are printed, changes the checkpoint cannot continue under
are refused unless ``run.allow_config_change``, and every config the run started with is kept
under ``configs/``.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from data_pipeline.reader import valid_mask

from .. import checkpoint as ckpt_lib
from ..checkpoint.distributed import (CheckpointLayout, PendingCheckpoint, load_distributed_checkpoint,
                                      save_distributed_checkpoint)
from ..config import Config, ParallelConfig, config_to_dict
from ..diffusion.diagnostics import priority_exponents
from ..diffusion.objective import StepSpec
from ..diffusion.randomness import scalar_key
from ..diffusion.schedulers import build_scheduler
from ..model import build_model
from ..parallel import (ProcessEnv, any_rank, clip_grad_norm_, distributed_validation_nelbo, dp_rank, dp_size,
                        forward_backward, gather_full_parameters, global_loss_values, init_process_group, local_rows,
                        mesh_from_layout, parallelize_model, process_device, seed_dropout, shutdown_process_group,
                        validate_layout, writes_dp_slice_state)
from ..parallel.flops import config_step_flops, device_peak_flops
from ..parallel.runtime import peak_host_memory_bytes, resolve_autocast
from . import config_history
from .data import build_data
from .ema import EMA
from .metrics import MetricsLogger, print0, throughput
from .optimizer import build_optimizer, set_learning_rate
from .order_monitor import OrderMonitor


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. repeated non-finite losses); the message names the step."""


@dataclass
class TrainResult:
    status: str          # "completed" or "interrupted"
    step: int
    last_eval: dict | None
    nonfinite_skipped: int
    checkpoint: Path | None = None
    """The newest complete checkpoint of the run directory when the run returned."""
    samples: Path | None = None
    """The samples file written last in this session (None when none was)."""
    tensorboard: Path | None = None
    """The TensorBoard log directory (None on ranks other than 0)."""
    wall_seconds: float = 0.0
    """From the start of ``Trainer.__init__`` to the end of the loop."""
    phase_seconds: dict = field(default_factory=dict)
    """Seconds per phase of this session: setup, training, evaluation, sampling, checkpoints."""


class _Counted:
    """An iterable with a known length, so that a progress bar over it shows a total."""

    def __init__(self, iterable, length: int):
        self.iterable, self.length = iterable, length

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self) -> int:
        return self.length


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


class Trainer:
    """``Trainer(cfg).run()``: one process's part of a run. ``env`` defaults to torchrun's variables
    of this process (one process when none are set); a multi-process job starts its process group
    here and leaves it at the end of :meth:`run`. ``parallel``: the layout already checked against
    this world size (``validate_layout``'s result, as ``python -m lomdm_dist.train`` has it);
    checked here when None."""

    def __init__(self, cfg: Config, *, env: ProcessEnv | None = None, parallel: ParallelConfig | None = None):
        self._started = time.perf_counter()
        self.cfg = cfg
        self.env = env or ProcessEnv.from_environ()
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self.parallel = parallel if parallel is not None else validate_layout(cfg, self.world_size)
        self.run_dir = Path(cfg.run.dir)
        self.device = process_device(self.env, cfg.train.device)
        self.autocast_dtype = resolve_autocast(cfg.train.precision, self.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self._owns_group = init_process_group(self.env, self.device, timeout_s=cfg.parallel.collective_timeout_s)
        self._build()

    def _build(self) -> None:
        cfg = self.cfg
        config_tree = config_to_dict(cfg)
        latest = ckpt_lib.latest_checkpoint(self.run_dir)
        # Before anything is built: a resume the checkpoint cannot continue under fails in a second.
        config_changes = config_history.check_resume(latest, config_tree, allow=cfg.run.allow_config_change)
        self.mesh = mesh_from_layout(self.parallel)
        self.layout = CheckpointLayout(world_size=self.world_size, tp=self.parallel.tp, pp=self.parallel.pp,
                                       dp_replicate=self.parallel.dp_replicate, dp_shard=self.parallel.dp_shard)
        self.data = build_data(cfg, dp_rank=dp_rank(self.mesh), dp_size=dp_size(self.mesh))
        self.vocab_size = self.data.vocab_size + 1          # + the mask token
        with torch.device("meta"):                         # laid out first; each rank then fills only its shard
            model = build_model(cfg.model, cfg.diffusion, self.vocab_size)
        self.n_params = sum(p.numel() for p in model.parameters())
        param_dtype = self.autocast_dtype if self.parallel.dp > 1 else None   # FSDP2 mixed precision
        self.pm = parallelize_model(model, self.mesh, cfg, device=self.device, param_dtype=param_dtype,
                                    init_seed=cfg.train.seed)
        self.model = self.pm.model
        seed_dropout(cfg.train.seed, self.mesh, self.parallel.sequence_parallel)
        self.scheduler = build_scheduler(cfg.diffusion)
        self.optimizer = build_optimizer(self.model, cfg.optim, fused=self.device.type == "cuda")
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.rows = local_rows(self.mesh, cfg.data.batch_size, device=self.device)
        self.step = 0
        self.warmup_from = 0           # the step the learning-rate warm-up starts from
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self._stop_signal: int | None = None
        self.last_eval: dict | None = None
        self._pending: PendingCheckpoint | None = None
        self._inference: torch.nn.Module | None = None
        self.async_checkpoints = self.device.type == "cuda" and cfg.train.async_checkpoint
        self.show_progress = cfg.train.progress and self.rank == 0
        self._bar: tqdm | None = None
        self._final = False                      # after the last step: phases print lines of their own
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self.last_checkpoint: Path | None = None
        self.last_samples: Path | None = None
        self._eval_batches_count: int | None = None
        self.peak_flops = device_peak_flops(
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "bf16" if self.autocast_dtype == torch.bfloat16 else None)

        resumed_from = self._maybe_resume()
        if self.rank == 0:
            config_history.record_config(self.run_dir, config_tree, step=self.step)
        self.metrics = MetricsLogger(self.run_dir, resume_step=self.step if resumed_from else None,
                                     enabled=self.rank == 0)
        self.order_monitor = OrderMonitor(cfg.optim.warmup_steps, cfg.train.order_spread_floor,
                                          cfg.train.order_patience)
        par = self.parallel
        print0(f"model: {self.n_params / 1e6:.2f}M parameters, vocab {self.vocab_size}, scheduler "
               f"{cfg.diffusion.scheduler}, {self.world_size} process(es) on {self.device.type} "
               f"(tp {par.tp}, pp {par.pp}, dp_shard {par.dp_shard}, dp_replicate {par.dp_replicate}), "
               f"peak host memory {peak_host_memory_bytes() / 2**30:.2f} GiB"
               + (f", peak device memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
                  if self.device.type == "cuda" else "") + " on rank 0"
               + (f", resumed from {resumed_from}" if resumed_from else ""), rank=self.rank)
        if resumed_from and config_changes:
            print0(config_history.describe_changes(config_changes, resumed_from, self.step)
                   + f"\n  (every config this run started with: {self.run_dir / config_history.HISTORY_DIR})",
                   rank=self.rank)
        self.phase_seconds["setup"] = time.perf_counter() - self._started

    def close(self) -> None:
        """Leave the process group this trainer started (nothing for one process); every rank calls it.

        After an error that not every rank shares, the group is left to the process's exit instead:
        a barrier would hang, and closing it early would make the peers fail before this rank
        has said why.
        """
        if self._owns_group:
            shutdown_process_group(clean=True)
            self._owns_group = False

    # ----------------------------------------------------------------------------------- state
    def _trainer_state(self) -> dict:
        return {"step": self.step, "ema_num_updates": self.ema.num_updates,
                "nonfinite_total": self.nonfinite_total, "nonfinite_in_row": self.nonfinite_in_row,
                "warmup_from": self.warmup_from}

    def _rank_state(self) -> dict:
        """What only this rank knows: its dropout generator state."""
        cuda = self.device.type == "cuda"
        return {"rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(self.device) if cuda else torch.empty(0, dtype=torch.uint8)}

    def save(self, *, background: bool = False) -> Path | None:
        """Write a checkpoint with every rank; returns its directory (None while a background write runs)."""
        self._finish_pending()
        result = save_distributed_checkpoint(
            self.run_dir, self.step, model=self.model, optimizer=self.optimizer, ema_shadow=self.ema.shadow,
            data_state=self.data.state_dict(), dp_rank=dp_rank(self.mesh), dp_size=dp_size(self.mesh),
            write_data_state=writes_dp_slice_state(self.mesh), rank_state=self._rank_state(),
            trainer_state=self._trainer_state(),
            config_yaml=yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False),
            meta={"vocab_size": self.vocab_size, "tokenizer": self.cfg.data.tokenizer,
                  "scheduler": self.cfg.diffusion.scheduler},
            layout=self.layout, keep=self.cfg.train.keep_checkpoints, async_save=background and self.async_checkpoints,
            export_weights=self.cfg.train.export_safetensors)
        if isinstance(result, PendingCheckpoint):
            self._pending = result
            return None
        self.last_checkpoint = result
        return result

    def _finish_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.last_checkpoint = pending.finish()

    # ---------------------------------------------------------------------------------- console
    @contextlib.contextmanager
    def _phase(self, name: str, label: str):
        """Time a phase between steps (``phase_seconds[name]``) and say that it runs.

        Mid-run the progress bar's label names it (no extra lines every eval_every steps); after
        the last step, when the bar is finished, ``label`` is printed as a line of its own.
        """
        start = time.perf_counter()
        bar = self._bar if self._bar is not None and not self._bar.disable else None
        if self._final:
            print0(f"{label} ...", rank=self.rank)
        elif bar is not None:
            bar.set_description_str(f"train [{name}]", refresh=True)
        try:
            yield
        finally:
            self.phase_seconds[name] += time.perf_counter() - start
            if bar is not None and not self._final:
                bar.set_description_str("train", refresh=True)

    def _eval_batches(self):
        """The validation batches of one evaluation, with their count when the manifest gives it."""
        max_batches = self.cfg.eval.max_batches
        batches = self.data.eval_batches(max_batches=max_batches)
        if self._eval_batches_count is None:
            from data_pipeline.reader import read_manifest
            try:
                manifest = read_manifest(self.data.val_manifest)
                samples = int(manifest.get("num_samples") or sum(int(s["samples"]) for s in manifest["shards"]))
            except Exception:  # the count only labels a progress bar; the evaluation reports real errors
                return batches
            count = -(-samples // self.cfg.data.eval_batch_size)
            self._eval_batches_count = min(count, max_batches) if max_batches else count
        return _Counted(batches, self._eval_batches_count)

    def _maybe_resume(self) -> Path | None:
        latest = ckpt_lib.latest_checkpoint(self.run_dir)
        if latest is None:
            return None
        saved_vocab = ckpt_lib.read_meta(latest).get("vocab_size")
        if saved_vocab is not None and int(saved_vocab) != self.vocab_size:
            raise ckpt_lib.CheckpointError(
                f"checkpoint {latest} has vocabulary {saved_vocab}, the data has {self.vocab_size}")
        # A converted checkpoint (tools/convert_checkpoint.py) holds weights only: AdamW starts fresh.
        weights_only = "optimizer" not in ckpt_lib.saved_parts(latest / ckpt_lib.STATE_DIR)
        if weights_only:
            print0(f"checkpoint {latest} holds weights only (no optimizer state): AdamW starts with fresh "
                   f"moments and the learning rate warms up again over optim.warmup_steps", rank=self.rank)
        loaded = load_distributed_checkpoint(latest, model=self.model,
                                             optimizer=None if weights_only else self.optimizer,
                                             ema_shadow=self.ema.shadow, dp_rank=dp_rank(self.mesh),
                                             dp_size=dp_size(self.mesh), layout=self.layout)
        state = loaded.trainer_state or {}
        try:
            self.step = int(state["step"])
            self.ema.num_updates = int(state["ema_num_updates"])
            self.nonfinite_total = int(state["nonfinite_total"])
            self.nonfinite_in_row = int(state["nonfinite_in_row"])
            # Fresh AdamW moments make the first updates about lr in size for every weight: at the
            # full rate that undoes much of the loaded model, so a weights-only start warms up again.
            self.warmup_from = self.step if weights_only else int(state.get("warmup_from", 0))
        except (KeyError, TypeError, ValueError) as err:
            raise ckpt_lib.CheckpointError(f"checkpoint {latest}: trainer.pt lacks {err}") from None
        if loaded.rank_state is not None:      # same layout: continue this rank's dropout stream
            torch.set_rng_state(loaded.rank_state["rng_cpu"])
            if self.device.type == "cuda" and loaded.rank_state["rng_cuda"].numel():
                torch.cuda.set_rng_state(loaded.rank_state["rng_cuda"], self.device)
        else:                                  # another layout: a fresh, step-dependent dropout stream
            seed_dropout(scalar_key(self.cfg.train.seed, self.step), self.mesh, self.parallel.sequence_parallel)
        self.data.restore(loaded.data_state, loaded.data_states)
        return latest

    # ------------------------------------------------------------------------------------ step
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def compute_loss(self, x: torch.Tensor):
        """Forward and backward on this rank's rows ``x``: gradients accumulated, values detached."""
        valid = valid_mask(x, self.data.pad_id)
        with self._autocast():
            spec = StepSpec(seed=self.cfg.train.seed, step=self.step, rows=self.rows,
                            global_batch=self.cfg.data.batch_size)
            return forward_backward(self.pm, self.scheduler, x, spec, cfg=self.cfg.diffusion, valid=valid)

    def train_step(self, x: torch.Tensor) -> dict | None:
        """One update; returns metrics, or None when the loss was non-finite and the update skipped."""
        cfg = self.cfg
        lr = set_learning_rate(self.optimizer, self.step - self.warmup_from, cfg.optim.warmup_steps)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.compute_loss(x)
        if any_rank(not torch.isfinite(out.loss).item(), self.device):
            return self._skip_nonfinite("loss")
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm_(self.pm.parameters(), max_norm, self.pm.pp_group)   # global: the same on every rank
        if not torch.isfinite(grad_norm).item():
            return self._skip_nonfinite("gradient norm")
        self.optimizer.step()
        self.ema.update(self.model)
        self.nonfinite_in_row = 0
        values = global_loss_values(self.pm, out)
        values.update(lr=lr, grad_norm=grad_norm.item())
        return values

    def _skip_nonfinite(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        print0(f"step {self.step}: non-finite {what}, update skipped "
               f"({self.nonfinite_in_row} in a row, {self.nonfinite_total} in total)", rank=self.rank)
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
            raise TrainingError(f"{self.nonfinite_in_row} non-finite losses in a row, the last at step {self.step} "
                                f"(train.max_nonfinite_in_row = {self.cfg.train.max_nonfinite_in_row}); "
                                f"lower optim.lr or check the data")
        return None

    def _step_flops(self, values: dict) -> float:
        return config_step_flops(self.cfg, vocab_size=self.vocab_size, rows=self.cfg.data.batch_size,
                                 masked_fraction=values["masked_fraction"]).total

    # ------------------------------------------------------------------------------------ eval
    def evaluate(self) -> dict:
        """Validation NELBO on every rank (its line printed as soon as it is known); on rank 0 also
        priority images and samples (when enabled)."""
        cfg = self.cfg
        swap = self.ema.swapped_in(self.model) if cfg.eval.use_ema else contextlib.nullcontext()
        with swap:
            batches = self._eval_batches()
            count = (f"{len(batches)} validation batch{'es' if len(batches) != 1 else ''}"
                     if isinstance(batches, _Counted) else "validation set")
            with self._phase("evaluation", f"evaluating ({count})"):
                result = distributed_validation_nelbo(
                    self.pm, self.scheduler, batches, cfg=cfg.diffusion, seed=cfg.train.seed, device=self.device,
                    pad_id=self.data.pad_id, t_samples=cfg.eval.t_samples, autocast_dtype=self.autocast_dtype,
                    progress=self.show_progress)
            print0(f"step {self.step}: val_nelbo {result['val_nelbo']:.4f}  val_ppl {result['val_ppl']:.1f}",
                   rank=self.rank)
            if self.scheduler.learned or cfg.sample.every_eval:
                images = " and generation-order images" if self.scheduler.learned else ""
                label = (f"sampling ({cfg.sample.num} samples of {cfg.sample.steps} steps{images})"
                         if cfg.sample.every_eval else "drawing generation-order images")
                with self._phase("sampling", label):
                    model = self._inference_model()
                    if model is not None:
                        if self.scheduler.learned:
                            self._log_priorities(model)
                        if cfg.sample.every_eval:
                            self._write_samples(model)
        self.last_eval = result
        return result

    def _inference_model(self) -> torch.nn.Module | None:
        """The whole model with the current weights on rank 0, None elsewhere (collective).

        One process: the trained model itself. Several: a plain copy on rank 0 filled with the
        weights gathered from every rank (``gather_full_parameters``).
        """
        if self.pm.is_plain:
            return self.model
        weights = gather_full_parameters(self.pm)
        if weights is None:
            return None
        if self._inference is None:
            self._inference = build_model(self.cfg.model, self.cfg.diffusion, self.vocab_size).to(self.device)
        with torch.no_grad():
            for name, param in self._inference.named_parameters():
                param.copy_(weights[name])
        return self._inference

    @torch.no_grad()
    def _log_priorities(self, model: torch.nn.Module, rows: int = 8) -> None:
        """Histogram of the learned exponents k_phi and an image of them per position (rows x L) for
        a few validation rows: where the model puts its generation priority."""
        x = next(iter(self.data.eval_batches(max_batches=1)), None)
        if x is None or x.shape[0] == 0:
            return
        x = x[:rows].to(self.device)
        valid = valid_mask(x, self.data.pad_id)
        k = priority_exponents(model, self.scheduler, x, valid, autocast_dtype=self.autocast_dtype)
        self.metrics.histogram("order/k_phi", k[valid], self.step)
        if self.metrics.writer is not None:
            from .order_images import priority_image
            image = priority_image(k, valid, c1=self.scheduler.c1, c2=self.scheduler.c2)
            self.metrics.rgb_image("order/k_phi_per_position", image, self.step)

    def _write_samples(self, model: torch.nn.Module) -> None:
        from ..diffusion.sampler import sample
        from .samples import write_samples

        cfg = self.cfg
        result = sample(model, self.scheduler, num=cfg.sample.num, seq_len=cfg.data.seq_len,
                        steps=cfg.sample.steps, diffusion_cfg=cfg.diffusion, t_min=cfg.sample.t_min,
                        final_argmax=cfg.sample.final_argmax, reverse_c2_zero=cfg.sample.reverse_c2_zero,
                        seed=cfg.sample.seed + self.step, device=self.device, progress=self._final and self.show_progress)
        path = self.run_dir / "samples" / f"step-{self.step:08d}.jsonl"
        provenance = {"step": self.step, "seed": cfg.sample.seed + self.step, "steps": cfg.sample.steps,
                      "t_min": cfg.sample.t_min, "num": cfg.sample.num, "seq_len": cfg.data.seq_len,
                      "final_argmax": cfg.sample.final_argmax, "reverse_c2_zero": cfg.sample.reverse_c2_zero,
                      "weights": "ema" if cfg.eval.use_ema else "raw", "argmax_filled": result.argmax_filled}
        texts = write_samples(path, result, self.data.decode, vocab_size=self.data.vocab_size,
                              provenance=provenance)
        self.last_samples = path
        self.metrics.text("samples/text", "\n\n---\n\n".join(texts[:4]), self.step)
        if self.metrics.writer is not None:
            from .order_images import generation_order_image
            self.metrics.rgb_image("order/generation_order", generation_order_image(result.order, cfg.sample.steps),
                                   self.step)

    # ------------------------------------------------------------------------------------ loop
    def _handle_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        print0(f"received signal {signum}: saving a checkpoint at the next step boundary", rank=self.rank)

    def run(self) -> TrainResult:
        """Train to ``train.max_steps`` (or a stop signal); leaves the process group at the end.

        Any other error propagates with the group still open (see :meth:`close`)."""
        try:
            result = self._loop()
        except TrainingError:
            self.close()          # raised on every rank at the same step (the non-finite check is shared)
            raise
        self.close()
        if self.rank == 0:
            print0(self.summary(result), rank=self.rank)
        return result

    def summary(self, result: TrainResult) -> str:
        """What a finished (or stopped) run did and where its outputs are, for the console."""
        how = "completed" if result.status == "completed" else "stopped by signal"
        phases = ", ".join(f"{name} {_duration(seconds)}" for name, seconds in result.phase_seconds.items()
                           if seconds >= 0.05)
        lines = [f"run {how} at step {result.step} ({self.steps_this_session} steps this session) in "
                 f"{_duration(result.wall_seconds)}" + (f": {phases}" if phases else "")]
        if result.last_eval:
            lines.append(f"  final validation:  val_nelbo {result.last_eval['val_nelbo']:.4f}, "
                         f"val_ppl {result.last_eval['val_ppl']:.1f}")
        if result.checkpoint is not None:
            lines.append(f"  checkpoint:        {result.checkpoint}")
        if result.samples is not None:
            lines.append(f"  samples:           {result.samples}")
        lines.append(f"  metrics:           {self.run_dir / 'metrics.jsonl'}")
        if result.tensorboard is not None:
            lines.append(f"  tensorboard:       tensorboard --logdir {result.tensorboard}")
        return "\n".join(lines)

    def _loop(self) -> TrainResult:
        cfg = self.cfg.train
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not in the main thread: leave handlers alone
                previous[sig] = signal.signal(sig, self._handle_signal)
        tokens_per_step = self.cfg.data.batch_size * self.cfg.data.seq_len
        bar = self._bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                               disable=not self.show_progress)
        batches = iter(self.data)
        status = "completed"
        first_step = self.step
        loop_start = time.perf_counter()
        window_start, window_steps, window_flops = time.perf_counter(), 0, 0.0
        try:
            while self.step < cfg.max_steps:
                if any_rank(self._stop_signal is not None, self.device):   # every rank stops at the same step
                    status = "interrupted"
                    break
                x = next(batches).to(self.device, non_blocking=True)
                values = self.train_step(x)
                self.step += 1
                window_steps += 1
                bar.update(1)
                if self.step == cfg.max_steps:
                    self._final = True
                if values is not None and self.peak_flops is not None:
                    window_flops += self._step_flops(values)
                if values is not None and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                    values.update(throughput(tokens_per_step * window_steps, time.perf_counter() - window_start,
                                             self.world_size, flops=window_flops or None,
                                             peak_flops_per_device=self.peak_flops))
                    if self.device.type == "cuda":
                        values["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                    values["nonfinite_skipped"] = self.nonfinite_total
                    values.update(self.data.stats)
                    self.metrics.log(self.step, values)
                    warning = self.order_monitor.update(self.step, values)
                    if warning:
                        print0(f"warning: {warning}", rank=self.rank)
                        self.metrics.text("order/warning", warning, self.step)
                    bar.set_postfix(loss=f"{values['loss']:.3f}", nelbo=f"{values['nelbo']:.3f}")
                    window_start, window_steps, window_flops = time.perf_counter(), 0, 0.0
                if self._final:
                    bar.close()        # complete; what follows prints lines of its own
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    result = self.evaluate()
                    self.metrics.log(self.step, result)
                    window_start, window_steps, window_flops = time.perf_counter(), 0, 0.0
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                    final = self.step == cfg.max_steps
                    with self._phase("checkpoints", f"writing checkpoint {ckpt_lib.step_dir_name(self.step)}"):
                        self.save(background=not final)
            self._final = True
            bar.close()
            if self._pending is not None:
                with self._phase("checkpoints", "finishing the checkpoint written in the background"):
                    self._finish_pending()
            if status == "interrupted":
                with self._phase("checkpoints", f"stopped by signal: writing checkpoint "
                                                f"{ckpt_lib.step_dir_name(self.step)}"):
                    self.save()
        finally:
            bar.close()
            self._bar = None
            self.metrics.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.steps_this_session = self.step - first_step
        between_steps = sum(self.phase_seconds[p] for p in ("evaluation", "sampling", "checkpoints"))
        self.phase_seconds["training"] = time.perf_counter() - loop_start - between_steps
        order = ("setup", "training", "evaluation", "sampling", "checkpoints")
        return TrainResult(status=status, step=self.step, last_eval=self.last_eval,
                           nonfinite_skipped=self.nonfinite_total,
                           checkpoint=self.last_checkpoint or ckpt_lib.latest_checkpoint(self.run_dir),
                           samples=self.last_samples,
                           tensorboard=self.metrics.tensorboard_dir if self.metrics.writer is not None else None,
                           wall_seconds=time.perf_counter() - self._started,
                           phase_seconds={p: self.phase_seconds[p] for p in order if p in self.phase_seconds})
