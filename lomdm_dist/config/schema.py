"""Typed configuration: the dataclasses are the source of truth for every key.

A YAML file fills these, ``key.sub=value`` overrides apply last (see ``loader.py``). Each field's
docstring-comment says what it controls. Every section checks its own keys (``validate()`` of the
section); :meth:`Config.validate` runs each section's check once and adds the checks that need two
sections. Both raise :class:`ConfigError` naming the offending key, before any work starts. The
``parallel`` section's fit to the world size, the model and the batch is checked where the world
size is known (``lomdm_dist.parallel.layout.validate_layout``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .errors import ConfigError
from .parallel import ParallelConfig
from .slurm import SlurmConfig

SchedulerName = Literal["mdlm", "poly", "arm", "block", "lomdm"]


def require_positive(values: dict[str, float]) -> None:
    """Raise :class:`ConfigError` for the first key (full dotted name) whose value is not > 0."""
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, checkpoints/, metrics.jsonl and TensorBoard events live here."""
    name: str = ""
    """Optional human-readable run name (defaults to the directory name)."""
    allow_config_change: bool = False
    """Resume a run directory even when keys its checkpoint cannot continue under changed (model shape,
    scheduler, c1/c2, seq_len, tokenizer, data set, seed); without it such a resume is refused."""

    def validate(self) -> "RunConfig":
        """Nothing to check: every value of the section is usable."""
        return self


@dataclass
class DataConfig:
    source: Literal["wikipedia_excerpt", "shards"] = "wikipedia_excerpt"
    """Where training rows come from: the bundled Wikipedia excerpt (built on first use) or shards."""
    path: str = ""
    """Wikipedia dump file (default: the excerpt shipped with gensim) or a shard manifest (source=shards)."""
    val_path: str = ""
    """Validation shard manifest (source=shards); empty means '<train manifest dir>/../val/manifest.json'."""
    cache_dir: str = "data/cache"
    """Where built shards of the bundled corpus are cached between runs."""
    tokenizer: str = "gpt2"
    """Tokenizer name (gpt2, bert-base-uncased) or a sentencepiece model path."""
    seq_len: int = 128
    """Tokens per row, BOS and EOS included."""
    batch_size: int = 16
    """Global batch size in rows (each LoMDM row gets two masks)."""
    eval_batch_size: int = 16
    """Rows per validation batch."""
    val_docs: int = 8
    """Documents held out for validation (the last ones of the corpus, as the OWT recipe does)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    skip_corrupt_shards: bool = False
    """Skip (log and count) corrupt shards instead of failing."""
    verify_checksums: bool = False
    """Compare every training and validation shard's sha256 with its manifest when the run starts.
    Catches corruption that keeps a shard's size (bit rot, a bad copy), which the size and token-id
    checks miss, at the price of reading all the data once per process. A mismatch is a corrupt
    shard: an error naming it, or skipped (training shards only) with skip_corrupt_shards."""

    def validate(self) -> "DataConfig":
        """Reject impossible values of the ``data`` section; every message names the key."""
        require_positive({"data.seq_len": self.seq_len, "data.batch_size": self.batch_size,
                          "data.eval_batch_size": self.eval_batch_size})
        if self.seq_len < 3:
            raise ConfigError("data.seq_len must be at least 3 (BOS, one token, EOS)")
        if self.source == "shards" and not self.path:
            raise ConfigError("data.path must name a shard manifest when data.source is 'shards'")
        return self


@dataclass
class ModelConfig:
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    cond_dim: int = 128
    """Width of the adaLN conditioning vector (MDLM: 128)."""
    mlp_ratio: int = 4
    dropout: float = 0.1
    time_conditioning: bool = False
    """Feed the noise level to adaLN (MDLM default: off, a constant conditioning vector)."""
    rope_base: float = 10000.0
    head_mlp_hidden: int = 0
    """Hidden width of the phi/psi MLP (0 means d_model)."""

    def validate(self) -> "ModelConfig":
        """Reject shapes the model cannot be built with; every message names the key."""
        require_positive({"model.n_layers": self.n_layers, "model.d_model": self.d_model,
                          "model.n_heads": self.n_heads, "model.cond_dim": self.cond_dim,
                          "model.mlp_ratio": self.mlp_ratio})
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("model.d_model / model.n_heads must be even (rotary embeddings rotate pairs)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.head_mlp_hidden < 0:
            raise ConfigError(f"model.head_mlp_hidden must be >= 0, got {self.head_mlp_hidden}")
        if self.rope_base <= 0:
            raise ConfigError(f"model.rope_base must be positive, got {self.rope_base}")
        return self


@dataclass
class DiffusionConfig:
    scheduler: SchedulerName = "lomdm"
    """Forward/reverse scheduler family."""
    c1: float = 0.7
    """LoMDM mean exponent; also the exponent of the 'poly' scheduler."""
    c2: float = 0.65
    """LoMDM spread of exponents; must be < c1 so every exponent stays positive."""
    block_size: int = 4
    """Block length of the 'block' scheduler (BD3LM); must divide the sequence length."""
    window_eps: float = 1e-3
    """Epsilon regularising the 'arm' and 'block' schedulers (strictly decreasing alpha)."""
    time_sampling: Literal["auto", "importance", "truncated"] = "auto"
    """How t is drawn (``lomdm_dist.diffusion.time_sampling``): ``importance`` estimates the NELBO over
    the whole interval (0, 1] without bias; ``truncated`` is MDLM's t ~ U[t_eps, 1], which drops the
    share t_eps^k of each position's loss (large for small learned exponents). ``auto``: importance
    for lomdm, truncated for the fixed schedulers (numbers comparable with MDLM's)."""
    is_power: float = 0.0
    """Power b of the importance density lam * b t^(b-1) + (1 - lam); must stay below the smallest
    exponent (c1 - c2 for lomdm) for finite variance. 0: half the smallest exponent."""
    is_power_share: float = 0.2
    """lam: the share of times drawn from the power part (the rest is uniform on (0, 1])."""
    t_eps: float = 1e-3
    """Smallest diffusion time drawn by the truncated time sampling."""
    normsig: Literal["centered", "paper"] = "centered"
    """NormSig variant. ``paper``: sigmoid(g) - mean sigmoid(g). ``centered``: the same on g minus its
    row mean, so a common shift of g changes nothing; with ``paper`` the shift is a flat direction
    along which the head's read-out drifts into saturation (every sigmoid at 1, zero spread, zero
    gradient); see docs/method.md, "Keeping the learned order alive"."""
    antithetic: bool = True
    """Stratify t over the global batch (MDLM/GenMD4 antithetic sampling)."""
    masks_per_row: int = 0
    """Masks drawn per row; 0 means 2 for lomdm (RLOO) and 1 for fixed schedulers."""
    k_min: float = 1e-4
    """Clamp for exponents k and k_hat (numerical safety)."""
    mdlm_eps: float = 1e-3
    """MDLM log-linear schedule: 1 - alpha(t) = (1 - eps) t."""

    def resolved_masks_per_row(self) -> int:
        if self.masks_per_row:
            return self.masks_per_row
        return 2 if self.scheduler == "lomdm" else 1

    def validate(self) -> "DiffusionConfig":
        """Reject schedules that are not schedules (non-positive exponents, eps outside (0, 1), an
        importance density of infinite variance); every message names the key. Whether
        ``block_size`` divides the sequence length is :meth:`Config.validate`'s (two sections)."""
        require_positive({"diffusion.block_size": self.block_size})
        if self.scheduler == "lomdm":
            if self.c2 < 0:
                raise ConfigError(f"diffusion.c2 must be >= 0, got {self.c2}")
            if self.c1 <= self.c2:
                raise ConfigError(
                    f"diffusion.c1 ({self.c1}) must be greater than diffusion.c2 ({self.c2}): "
                    "exponents c1 + c2 * NormSig lie in (c1 - c2, c1 + c2) and must stay positive")
            if self.resolved_masks_per_row() != 2:
                raise ConfigError("diffusion.masks_per_row must be 2 for the lomdm scheduler (RLOO with two masks)")
        if self.scheduler == "poly" and self.c1 <= 0:
            raise ConfigError(f"diffusion.c1 (the poly exponent) must be positive, got {self.c1}")
        if not 0.0 < self.window_eps < 1.0:
            raise ConfigError(f"diffusion.window_eps must be in (0, 1), got {self.window_eps}")
        if not 0.0 < self.t_eps < 1.0:
            raise ConfigError(f"diffusion.t_eps must be in (0, 1), got {self.t_eps}")
        if not self.is_power >= 0:    # a negative power is no density; 0 alone means "choose for me"
            raise ConfigError(f"diffusion.is_power must be >= 0 (0: half the smallest exponent), got {self.is_power}")
        from ..diffusion.time_sampling import check_time_sampling   # the rule lives beside the sampler
        problem = check_time_sampling(self)
        if problem:
            raise ConfigError(problem)
        if not 0.0 <= self.mdlm_eps < 1.0:
            raise ConfigError(f"diffusion.mdlm_eps must be in [0, 1), got {self.mdlm_eps}")
        if self.masks_per_row < 0:
            raise ConfigError(f"diffusion.masks_per_row must be >= 0, got {self.masks_per_row}")
        return self


@dataclass
class OptimConfig:
    lr: float = 3e-4
    scheduler_lr: float = 0.0
    """Learning rate of the phi/psi heads (0 means the same as lr)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 2500
    grad_clip: float = 1.0
    """Global grad-norm clip (0 disables)."""

    def validate(self) -> "OptimConfig":
        """Reject impossible optimizer settings; every message names the key."""
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if self.scheduler_lr < 0:
            raise ConfigError(f"optim.scheduler_lr must be >= 0, got {self.scheduler_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must lie in [0, 1), got {self.betas}")
        return self


@dataclass
class TrainConfig:
    max_steps: int = 1000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    ckpt_every: int = 200
    keep_checkpoints: int = 3
    """Newest complete checkpoints kept on disk."""
    ema_decay: float = 0.9999
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    max_nonfinite_in_row: int = 5
    """Consecutive NaN/Inf losses tolerated (each is skipped and counted) before the run stops."""
    progress: bool = True
    """Show a progress bar."""
    threads: int = 0
    """torch CPU threads (0: leave torch's default)."""
    async_checkpoint: bool = False
    """On GPU, write checkpoints in the background (Distributed Checkpoint's async save)."""
    order_spread_floor: float = 0.01
    """LoMDM: warn (console and TensorBoard ``order/warning``) when the spread of k_phi stays below this
    for ``order_patience`` logged steps after warm-up, or when most of the phi head's sigmoids are
    saturated: the learned order is then dead. 0 switches the check off."""
    order_patience: int = 5
    """Consecutive logged steps of a dead-looking order before the warning."""
    export_safetensors: bool = False
    """Also write consolidated model.safetensors / ema.safetensors into every checkpoint (a second copy
    of the weights; ``python -m lomdm_dist.checkpoint.export`` makes one on demand instead)."""

    def validate(self) -> "TrainConfig":
        """Reject impossible schedules and limits of the loop; every message names the key."""
        require_positive({"train.max_steps": self.max_steps, "train.log_every": self.log_every,
                          "train.eval_every": self.eval_every, "train.ckpt_every": self.ckpt_every,
                          "train.keep_checkpoints": self.keep_checkpoints,
                          "train.max_nonfinite_in_row": self.max_nonfinite_in_row})
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.order_patience <= 0:
            raise ConfigError(f"train.order_patience must be positive, got {self.order_patience}")
        if self.order_spread_floor < 0:
            raise ConfigError(f"train.order_spread_floor must be >= 0, got {self.order_spread_floor}")
        return self


@dataclass
class EvalConfig:
    max_batches: int = 0
    """Validation batches per evaluation (0: the whole validation split)."""
    use_ema: bool = True
    """Evaluate and sample with EMA weights."""
    t_samples: int = 1
    """Time samples per validation row."""

    def validate(self) -> "EvalConfig":
        """Reject impossible evaluation settings; every message names the key."""
        if self.t_samples <= 0:
            raise ConfigError(f"eval.t_samples must be positive, got {self.t_samples}")
        if self.max_batches < 0:
            raise ConfigError(f"eval.max_batches must be >= 0, got {self.max_batches}")
        return self


@dataclass
class SampleConfig:
    num: int = 2
    steps: int = 64
    """Reverse steps (NFE upper bound; caching skips calls when nothing changes)."""
    t_min: float = 0.0
    """Last time of the uniform grid linspace(1, t_min, steps + 1). 0 ends at t = 0, where every
    position left is sampled; MDLM's 1e-5 leaves the share t_min^k_hat to the final argmax."""
    final_argmax: bool = True
    """Fill positions still masked after the last step with the denoiser's argmax (MDLM); the count
    is reported (``argmax_filled``). Nothing is left at t_min = 0."""
    reverse_c2_zero: bool = False
    """Ablation: reverse exponents k_hat = c1 for every position (random order)."""
    seed: int = 0
    every_eval: bool = True
    """Write samples to the run directory at each evaluation and at the end."""

    def validate(self) -> "SampleConfig":
        """Reject impossible sampler settings; every message names the key."""
        require_positive({"sample.steps": self.steps, "sample.num": self.num})
        if not 0.0 <= self.t_min < 1.0:
            raise ConfigError(f"sample.t_min must be in [0, 1), got {self.t_min}")
        return self


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def validate(self) -> "Config":
        """Check every section (each its own keys, once), then what involves two sections; every
        message names the key. Returns the config."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        d, data = self.diffusion, self.data
        if d.scheduler == "block" and data.seq_len % d.block_size:
            raise ConfigError(
                f"diffusion.block_size ({d.block_size}) must divide data.seq_len ({data.seq_len})")
        return self
