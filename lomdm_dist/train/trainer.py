"""The training loop: one process here; the mesh-aware pieces (rank, world size, global rows) are
already parameters so the distributed engine can drive the same loop.

Per step: rows of the global batch -> ``diffusion_loss`` (three passes for LoMDM) -> backward ->
non-finite check -> grad clip -> AdamW -> EMA. Evaluation, sampling and checkpoints run on schedule;
SIGTERM / SIGUSR1 make the loop save a checkpoint at the next step boundary and return.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from ..config import Config, config_to_dict, save_config
from ..diffusion.objective import diffusion_loss
from ..diffusion.schedulers import build_scheduler
from ..eval.perplexity import validation_nelbo
from ..model import build_model
from . import checkpoint as ckpt_lib
from .data import build_data
from .ema import EMA
from .metrics import MetricsLogger, print0
from .optimizer import build_optimizer, set_learning_rate


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. repeated non-finite losses); the message names the step."""


@dataclass
class TrainResult:
    status: str          # "completed" or "interrupted"
    step: int
    last_eval: dict | None
    nonfinite_skipped: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but CUDA is not available")
    return torch.device(name)


def resolve_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class Trainer:
    def __init__(self, cfg: Config, *, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.run_dir = Path(cfg.run.dir)
        self.device = resolve_device(cfg.train.device)
        self.autocast_dtype = resolve_autocast(cfg.train.precision, self.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)

        self.data = build_data(cfg, rank=rank, world_size=world_size)
        self.vocab_size = self.data.vocab_size + 1          # + the mask token
        self.model = build_model(cfg.model, cfg.diffusion, self.vocab_size).to(self.device)
        self.scheduler = build_scheduler(cfg.diffusion)
        self.optimizer = build_optimizer(self.model, cfg.optim, fused=self.device.type == "cuda")
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self._stop_signal: int | None = None
        self.last_eval: dict | None = None

        resumed_from = self._maybe_resume()
        if rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsLogger(self.run_dir, resume_step=self.step if resumed_from else None,
                                     enabled=rank == 0)
        n_params = sum(p.numel() for p in self.model.parameters())
        print0(f"model: {n_params / 1e6:.2f}M parameters, vocab {self.vocab_size}, scheduler "
               f"{cfg.diffusion.scheduler}, device {self.device}"
               + (f", resumed from {resumed_from}" if resumed_from else ""), rank=rank)

    # ----------------------------------------------------------------------------------- state
    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "ema_num_updates": self.ema.num_updates,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": self.data.state_dict(),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_row": self.nonfinite_in_row,
        }

    def save(self) -> Path:
        path = ckpt_lib.save_checkpoint(
            self.run_dir, self.step, model_state=self.model.state_dict(), ema_state=self.ema.shadow,
            trainer_state=self._trainer_state(),
            config_yaml=yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False),
            meta={"vocab_size": self.vocab_size, "tokenizer": self.cfg.data.tokenizer,
                  "scheduler": self.cfg.diffusion.scheduler},
            keep=self.cfg.train.keep_checkpoints)
        return path

    def _maybe_resume(self) -> Path | None:
        latest = ckpt_lib.latest_checkpoint(self.run_dir)
        if latest is None:
            return None
        state = ckpt_lib.load_checkpoint(latest)
        if int(state["meta"]["vocab_size"]) != self.vocab_size:
            raise ckpt_lib.CheckpointError(
                f"checkpoint {latest} has vocabulary {state['meta']['vocab_size']}, the data has {self.vocab_size}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["trainer"]["optimizer"])
            self.ema.load_state_dict({"shadow": state["ema"], "num_updates": state["trainer"]["ema_num_updates"]})
        except (RuntimeError, KeyError, ValueError) as err:
            raise ckpt_lib.CheckpointError(
                f"checkpoint {latest} does not match this config (model or optimizer shapes differ): {err}") from None
        trainer = state["trainer"]
        self.step = int(trainer["step"])
        self.nonfinite_total = int(trainer["nonfinite_total"])
        self.nonfinite_in_row = int(trainer["nonfinite_in_row"])
        torch.set_rng_state(trainer["rng_cpu"])
        if torch.cuda.is_available() and trainer["rng_cuda"]:
            torch.cuda.set_rng_state_all(trainer["rng_cuda"])
        self.data.load_state_dict(trainer["data"])
        return latest

    # ------------------------------------------------------------------------------------ step
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def compute_loss(self, x: torch.Tensor):
        local_batch = x.shape[0]
        first = self.rank * local_batch
        rows = torch.arange(first, first + local_batch, device=self.device)
        valid = (x != self.data.pad_id) if self.data.pad_id is not None else None
        with self._autocast():
            return diffusion_loss(self.model, self.scheduler, x, cfg=self.cfg.diffusion, seed=self.cfg.train.seed,
                                  step=self.step, rows=rows, global_batch=self.cfg.data.batch_size, valid=valid)

    def train_step(self, x: torch.Tensor) -> dict | None:
        """One update; returns metrics, or None when the loss was non-finite and the update skipped."""
        cfg = self.cfg
        lr = set_learning_rate(self.optimizer, self.step, cfg.optim.warmup_steps)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.compute_loss(x)
        if not torch.isfinite(out.loss).item():
            return self._skip_nonfinite("loss")
        out.loss.backward()
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if not torch.isfinite(grad_norm).item():
            return self._skip_nonfinite("gradient norm")
        self.optimizer.step()
        self.ema.update(self.model)
        self.nonfinite_in_row = 0
        values = {"loss": out.loss.item(), "nelbo": out.nelbo.item(), "l_main": out.l_main.item(),
                  "l_velocity": out.l_velocity.item(), "lr": lr, "grad_norm": grad_norm.item()}
        values.update({k: v.item() for k, v in out.stats.items()})
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

    # ------------------------------------------------------------------------------------ eval
    def evaluate(self) -> dict:
        cfg = self.cfg
        swap = self.ema.swapped_in(self.model) if cfg.eval.use_ema else contextlib.nullcontext()
        with swap:
            result = validation_nelbo(
                self.model, self.scheduler, self.data.eval_batches(max_batches=cfg.eval.max_batches),
                cfg=cfg.diffusion, seed=cfg.train.seed, device=self.device, pad_id=self.data.pad_id,
                t_samples=cfg.eval.t_samples, autocast_dtype=self.autocast_dtype)
            if self.rank == 0:
                if self.scheduler.learned:
                    self._log_priorities()
                if cfg.sample.every_eval:
                    self._write_samples()
        self.last_eval = result
        return result

    @torch.no_grad()
    def _log_priorities(self, rows: int = 8) -> None:
        """Histogram of the learned exponents k_phi and an image of them per position (rows x L) for
        a few validation rows: where the model puts its generation priority."""
        from kernels.scheduler import lomdm_schedule

        x = next(iter(self.data.eval_batches(max_batches=1)), None)
        if x is None or x.shape[0] == 0:
            return
        x = x[:rows].to(self.device)
        valid = (x != self.data.pad_id) if self.data.pad_id is not None else torch.ones_like(x, dtype=torch.bool)
        backbone = self.model.backbone
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                c = backbone.conditioning(x.shape[0], torch.zeros(x.shape[0], device=self.device)
                                          if backbone.time_conditioning else None)
                g = self.model.phi(backbone.features(x, c), c).float()
            t = torch.full((x.shape[0],), 0.5, device=self.device)
            k = lomdm_schedule(g, t, valid, self.cfg.diffusion.c1, self.cfg.diffusion.c2,
                               k_min=self.cfg.diffusion.k_min).k
        finally:
            self.model.train(was_training)
        self.metrics.histogram("k_phi", k[valid], self.step)
        d = self.cfg.diffusion
        self.metrics.image("k_phi_per_position", (k - (d.c1 - d.c2)) / (2 * d.c2 if d.c2 > 0 else 1.0), self.step)

    def _write_samples(self) -> None:
        from ..diffusion.sampler import sample
        from .samples import write_samples

        cfg = self.cfg
        result = sample(self.model, self.scheduler, num=cfg.sample.num, seq_len=cfg.data.seq_len,
                        steps=cfg.sample.steps, diffusion_cfg=cfg.diffusion, t_min=cfg.sample.t_min,
                        final_argmax=cfg.sample.final_argmax, reverse_c2_zero=cfg.sample.reverse_c2_zero,
                        seed=cfg.sample.seed + self.step, device=self.device)
        texts = write_samples(self.run_dir / "samples" / f"step-{self.step:08d}.jsonl", result,
                              self.data.decode, vocab_size=self.data.vocab_size)
        self.metrics.text("samples", "\n\n---\n\n".join(texts[:4]), self.step)
        self.metrics.image("generation_order", result.order.float() / max(cfg.sample.steps, 1), self.step)

    # ------------------------------------------------------------------------------------ loop
    def _handle_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        print0(f"received signal {signum}: saving a checkpoint at the next step boundary", rank=self.rank)

    def run(self) -> TrainResult:
        cfg = self.cfg.train
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not in the main thread: leave handlers alone
                previous[sig] = signal.signal(sig, self._handle_signal)
        tokens_per_step = self.cfg.data.batch_size * self.cfg.data.seq_len
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not cfg.progress or self.rank != 0)
        batches = iter(self.data)
        status = "completed"
        window_start, window_steps = time.perf_counter(), 0
        try:
            while self.step < cfg.max_steps:
                if self._stop_signal is not None:
                    status = "interrupted"
                    break
                x = next(batches).to(self.device, non_blocking=True)
                values = self.train_step(x)
                self.step += 1
                window_steps += 1
                bar.update(1)
                if values is not None and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                    elapsed = time.perf_counter() - window_start
                    values["tokens_per_sec"] = tokens_per_step * window_steps / max(elapsed, 1e-9)
                    values["nonfinite_skipped"] = self.nonfinite_total
                    values.update(self.data.stats)
                    self.metrics.log(self.step, values)
                    bar.set_postfix(loss=f"{values['loss']:.3f}", nelbo=f"{values['nelbo']:.3f}")
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    result = self.evaluate()
                    self.metrics.log(self.step, result)
                    bar.write(f"step {self.step}: val_nelbo {result['val_nelbo']:.4f}  val_ppl {result['val_ppl']:.1f}")
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                    self.save()
            if status == "interrupted":
                path = self.save()
                print0(f"stopped by signal at step {self.step}; checkpoint {path}", rank=self.rank)
        finally:
            bar.close()
            self.metrics.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return TrainResult(status=status, step=self.step, last_eval=self.last_eval,
                           nonfinite_skipped=self.nonfinite_total)
