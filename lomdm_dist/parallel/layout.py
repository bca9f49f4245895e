"""Layout validation: does ``parallel.*`` fit the world size, the model and the batch?

Runs once per process, before any process group starts: the entry point (``load_run_config`` of
``python -m lomdm_dist.train``, the Slurm submitter) or, for code that builds a ``Trainer``
directly, the trainer itself, with the world size it was given; the mesh is then built from the
checked section. An impossible layout ends with a message naming the keys instead of a shape
error inside a collective or a hang. The section's own keys (sizes, choices) are
``ParallelConfig.validate``'s; this module checks what needs the world size, the model or the
batch. Nothing here imports ``torch.distributed``.
"""

from __future__ import annotations

from typing import Any

from ..config.errors import ConfigError
from ..config.parallel import ParallelConfig


def parallel_section(cfg: Any, parallel: ParallelConfig | None = None) -> ParallelConfig:
    """The ``parallel`` section, resolved (``microbatches`` 0 becomes its automatic count under a
    pipeline): the explicit argument, ``cfg`` itself when it is one, else ``cfg.parallel``, else
    the defaults.

    Every part of the engine takes its section from here or from :func:`validate_layout`, so no
    pipeline ever sees the automatic 0."""
    par = _given_section(cfg, parallel)
    return par.resolved() if _is_count(par.microbatches, 0) else par


def _given_section(cfg: Any, parallel: ParallelConfig | None) -> ParallelConfig:
    if parallel is not None:
        return parallel
    if isinstance(cfg, ParallelConfig):
        return cfg
    found = getattr(cfg, "parallel", None)
    return found if found is not None else ParallelConfig()


def _is_count(value: Any, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def _check_world_size(par: ParallelConfig, world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
    if par.world_size != world_size:
        raise ConfigError(
            f"parallel.pp ({par.pp}) x parallel.dp_replicate ({par.dp_replicate}) x parallel.dp_shard "
            f"({par.dp_shard}) x parallel.tp ({par.tp}) = {par.world_size} must equal the number of "
            f"processes ({world_size})")


def _check_tensor_parallel(par: ParallelConfig, model: Any, seq_len: int | None) -> None:
    tp = par.tp
    if tp == 1:
        return
    hidden = model.head_mlp_hidden or model.d_model
    divisible = {"model.n_heads": model.n_heads, "model.d_model": model.d_model,
                 "model.d_model * model.mlp_ratio (the MLP width)": model.d_model * model.mlp_ratio,
                 "model.head_mlp_hidden (0 means model.d_model)": hidden}
    for key, value in divisible.items():
        if value % tp:
            raise ConfigError(f"parallel.tp ({tp}) must divide {key} ({value})")
    if par.sequence_parallel and seq_len is not None and seq_len % tp:
        raise ConfigError(f"parallel.sequence_parallel needs parallel.tp ({tp}) to divide data.seq_len ({seq_len})")


def _check_pipeline(par: ParallelConfig, model: Any) -> None:
    if par.pp == 1:
        return
    stages = par.num_stages
    if model.n_layers % stages:
        raise ConfigError(f"parallel.pp ({par.pp}) x parallel.virtual_stages ({par.virtual_stages}) = {stages} "
                          f"pipeline stages must divide model.n_layers ({model.n_layers})")
    if par.pipeline_schedule == "1f1b" and par.microbatches < par.pp:
        raise ConfigError(f"parallel.microbatches ({par.microbatches}) must be >= parallel.pp ({par.pp}) "
                          "for the 1f1b schedule (0, the default, means parallel.pp)")
    if par.pipeline_schedule == "interleaved_1f1b":
        rounds = max(1, par.microbatches // par.pp)
        if par.microbatches % rounds:
            raise ConfigError(f"parallel.microbatches ({par.microbatches}) must be a multiple of "
                              f"max(1, microbatches // parallel.pp) = {rounds} for interleaved_1f1b")


def _check_batches(par: ParallelConfig, data: Any, automatic: bool) -> None:
    micro = par.microbatches if par.pp > 1 else 1
    split = par.dp * micro
    name = " x parallel.microbatches" + (" (automatic: parallel.pp)" if automatic else "")
    for key in ("batch_size", "eval_batch_size"):
        value = getattr(data, key, None)
        if value is None:
            continue
        if value % split:
            raise ConfigError(
                f"data.{key} ({value}) must be divisible by parallel.dp_replicate x parallel.dp_shard"
                + (name if micro > 1 else "") + f" = {split}")


def validate_layout(cfg: Any, world_size: int, parallel: ParallelConfig | None = None) -> ParallelConfig:
    """Check the layout against the world size, the model and the batch; return the section,
    resolved (see :func:`parallel_section`).

    ``cfg`` is the full :class:`~lomdm_dist.config.Config` (``model``, ``data``, ``parallel``),
    validated (``Config.validate``, which checks ``cfg.parallel``'s own keys); ``parallel``, a
    section that did not come with the config, overrides ``cfg.parallel`` and has its own keys
    checked here. Raises ``ConfigError`` naming the keys. Pure Python: call it once per process,
    before ``init_process_group``.
    """
    given = _given_section(cfg, parallel)
    if parallel is not None:
        parallel.validate()
    _check_world_size(given, world_size)
    par = given.resolved()
    data = getattr(cfg, "data", None)
    _check_tensor_parallel(par, cfg.model, getattr(data, "seq_len", None))
    _check_pipeline(par, cfg.model)
    if data is not None:
        _check_batches(par, data, automatic=given.microbatches == 0)
    return par
