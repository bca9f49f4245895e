"""Evaluate a checkpoint: NELBO per token, its standard error and perplexity on token shards or on
the zero-shot suite, in one process or any layout of the training engine (``tools/evaluate.py``).

Every rank builds the checkpoint's model (with the config overrides, e.g. ``parallel.tp=2``),
parallelises it for its layout, loads the sharded training state into it (any saved layout loads
into any other) and runs ``lomdm_dist.parallel.evaluate.distributed_validation_nelbo`` on the same
*global* batches: each row's t and mask are functions of its index in the data, so the numbers do
not depend on the layout, and the totals are summed over data-parallel ranks in float64. One
process is the same code with no mesh.

The estimate is the training's evaluation protocol (``eval.perplexity``): per row ``t_samples``
diffusion times, stratified (antithetic) over each batch and drawn by the configured time sampling,
one mask each; both parts of the bound (L_main and L_velocity). The EMA weights are used unless
``use_ema`` is off (or the checkpoint has none, which the result says).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from data_pipeline.errors import DataError

from ..config import ConfigError, load_config
from ..checkpoint import MARKER, CheckpointError, read_meta, resolve_checkpoint
from ..parallel.runtime import resolve_autocast
from . import zero_shot

SPLIT_DIRS = {"validation": "val", "train": "train", "test": "test"}
"""``--split`` of a build directory (``python -m data_pipeline.build --out DIR``) -> its folder."""


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate and how; the fields of ``tools/evaluate.py``'s command line."""

    ckpt: str
    """Checkpoint directory, or a run directory (its latest complete checkpoint)."""
    data: str
    """A shard manifest (file, its folder, or a build directory with ``val/`` and ``train/``), or
    ``zero-shot`` / names of the zero-shot corpora (comma-separated)."""
    split: str | None = None
    """``validation``, ``train`` or ``test``; default: the build's ``val/``, each corpus' own split."""
    t_samples: int = 1
    use_ema: bool = True
    batch_size: int = 0
    """Rows per global batch (0: the checkpoint's ``data.eval_batch_size``)."""
    max_rows: int = 0
    """Evaluate only the first rows of each data set (0: all)."""
    seed: int = 0
    overrides: tuple[str, ...] = ()
    """``key.sub=value`` applied to the checkpoint's config (layout, precision, time sampling...)."""
    data_dir: str | None = None
    """Local copies of the zero-shot corpora (default ``$LOMDM_ZERO_SHOT_DIR``, else the hub)."""
    seq_len: int = 0
    """Zero-shot row length (0: the checkpoint's ``data.seq_len``)."""
    layout: str = "wrap"
    doc_eos: bool = True
    progress: bool = True


@dataclass
class DatasetResult:
    """One data set's numbers; per token means nats per valid token (BOS/EOS included)."""

    dataset: str
    split: str
    rows: int
    tokens: int
    nelbo: float
    nelbo_se: float
    l_main: float
    l_velocity: float
    ppl: float
    """exp(NELBO): an upper bound on the perplexity (the NELBO bounds the negative log-likelihood)."""


@dataclass
class EvalReport:
    checkpoint: str
    step: int
    weights: str
    """``ema`` or ``raw``."""
    scheduler: str
    time_sampling: str
    t_samples: int
    seed: int
    world_size: int
    layout: dict
    results: list[DatasetResult] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class EvalData:
    """Global batches of one data set (the same on every rank) and what the loop needs to know."""

    name: str
    split: str
    batches: "_Batches"
    pad_id: int | None


class _Batches:
    """Global batches of ``batch_size`` rows (the last may be smaller) with a length for the bar."""

    def __init__(self, rows: Iterator[torch.Tensor] | torch.Tensor, count: int, batch_size: int):
        self.rows, self.count, self.batch_size = rows, count, batch_size

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if isinstance(self.rows, torch.Tensor):
            yield from self.rows[: self.count].split(self.batch_size)
            return
        left = self.count
        for batch in self.rows:
            if left <= 0:
                return
            yield batch[:left]
            left -= batch.shape[0]


def manifest_path(data: str, split: str | None) -> Path:
    """The manifest ``--data`` names: a file, a folder holding ``manifest.json``, or a build
    directory whose ``val/`` (``--split validation``, the default) or ``train/`` holds one."""
    path = Path(data).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise DataError(f"--data {data}: no such manifest, directory or zero-shot dataset "
                        f"(zero-shot names: {zero_shot.SUITE}, {', '.join(zero_shot.CORPORA)})")
    if split is None and (path / "manifest.json").is_file():
        return path / "manifest.json"
    folder = SPLIT_DIRS.get(split or "validation")
    if folder is None:
        raise DataError(f"--split {split}: expected one of {', '.join(SPLIT_DIRS)}")
    candidate = path / folder / "manifest.json"
    if candidate.is_file():
        return candidate
    raise DataError(f"--data {data}: no manifest.json in it or in {path / folder}")


def _shard_data(request: EvalRequest, vocab_size: int, batch_size: int) -> EvalData:
    from data_pipeline.reader import iter_eval_batches, read_manifest

    path = manifest_path(request.data, request.split)
    manifest = read_manifest(path)
    data_vocab = int(manifest["tokenizer"]["vocab_size"])
    if data_vocab + 1 != vocab_size:
        raise DataError(f"manifest {path}: tokenizer {manifest['tokenizer']['name']} has {data_vocab} ids but the "
                        f"checkpoint's model has {vocab_size - 1} (+ the mask token): data and checkpoint do not match")
    count = manifest["num_samples"] if not request.max_rows else min(request.max_rows, manifest["num_samples"])
    batches = iter_eval_batches(str(path), batch_size)
    return EvalData(name=str(path), split=manifest["split"], batches=_Batches(batches, count, batch_size),
                    pad_id=manifest.get("pad_id"))


def _zero_shot_data(request: EvalRequest, corpus: zero_shot.ZeroShotCorpus, tokenizer, seq_len: int,
                    batch_size: int) -> EvalData:
    rows = zero_shot.corpus_rows(corpus, tokenizer, seq_len=seq_len, data_dir=request.data_dir, split=request.split,
                                 layout=request.layout, doc_eos=request.doc_eos)
    rows = torch.from_numpy(rows)
    count = len(rows) if not request.max_rows else min(request.max_rows, len(rows))
    return EvalData(name=corpus.name, split=request.split or corpus.split,
                    batches=_Batches(rows, count, batch_size),
                    pad_id=tokenizer.pad if request.layout == "pad" else None)


def check_request(request: EvalRequest) -> None:
    """Reject bad values before anything is loaded; messages name the option."""
    if request.t_samples < 1:
        raise ConfigError(f"--t-samples must be positive, got {request.t_samples}")
    for name in ("batch_size", "max_rows", "seq_len"):
        if getattr(request, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(request, name)}")
    if request.layout not in zero_shot.LAYOUTS:
        raise ConfigError(f"--layout must be one of {', '.join(zero_shot.LAYOUTS)}, got {request.layout!r}")
    if request.split is not None and request.split not in SPLIT_DIRS:
        raise ConfigError(f"--split must be one of {', '.join(SPLIT_DIRS)}, got {request.split!r}")


def checkpoint_config(request: EvalRequest, world_size: int = 1):
    """(resolved checkpoint directory, its config with the overrides applied).

    The ``parallel`` section is not the run's: any saved layout loads into any other, so the
    evaluation's layout is the defaults plus the ``parallel.*`` overrides, with ``dp_shard``
    (unless given) taking the processes the other dimensions leave: data parallel by default.
    """
    from ..config.loader import parse_override

    ckpt = resolve_checkpoint(request.ckpt).resolve()
    config_file = ckpt / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint {ckpt}: config.yaml is missing")
    cfg = load_config(config_file, request.overrides)
    layout_overrides = [o for o in request.overrides if parse_override(o)[0].startswith("parallel.")]
    par = load_config(None, layout_overrides).parallel
    if not any(parse_override(o)[0] == "parallel.dp_shard" for o in layout_overrides):
        others = par.tp * par.pp * par.dp_replicate
        if world_size % others == 0:
            par = dataclasses.replace(par, dp_shard=world_size // others)
    cfg.parallel = par
    return ckpt, cfg


def checkpoint_step(ckpt: Path) -> int:
    import json

    try:
        return int(json.loads((ckpt / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable {MARKER} marker ({err})") from None


def run_evaluation(request: EvalRequest, env=None) -> EvalReport:
    """Evaluate on this process's part of the layout; every rank returns the same report.

    ``env`` is this process's place in the job (default: torchrun's variables; one process when
    none are set). A process group this call starts is left before it returns.
    """
    from data_pipeline.tokenizers import get_tokenizer

    from ..diffusion.schedulers import build_scheduler
    from ..diffusion.time_sampling import resolved_time_sampling
    from ..model import build_model
    from ..parallel import (ProcessEnv, build_mesh, init_process_group, parallelize_model, process_device,
                            shutdown_process_group, validate_layout)
    from ..checkpoint import STATE_DIR, load_distributed_checkpoint, saved_parts
    from ..parallel.evaluate import distributed_validation_nelbo
    from ..train.ema import EMA

    check_request(request)
    env = env or ProcessEnv.from_environ()
    ckpt, cfg = checkpoint_config(request, env.world_size)
    par = validate_layout(cfg, env.world_size)
    vocab_size = int(read_meta(ckpt)["vocab_size"])
    batch_size = request.batch_size or cfg.data.eval_batch_size
    seq_len = request.seq_len or cfg.data.seq_len
    corpora = (zero_shot.resolve_corpora(request.data)
               if not Path(request.data).expanduser().exists() and zero_shot.is_zero_shot(request.data) else None)
    if corpora is None:
        manifest_path(request.data, request.split)          # a missing manifest fails before the model is built
    device = process_device(env, cfg.train.device)
    owns_group = init_process_group(env, device, timeout_s=cfg.parallel.collective_timeout_s)
    clean = False
    try:
        mesh = build_mesh(cfg, env.world_size)
        model = build_model(cfg.model, cfg.diffusion, vocab_size)
        pm = parallelize_model(model, mesh, cfg, device=device)
        has_ema = "ema" in saved_parts(ckpt / STATE_DIR)
        use_ema = request.use_ema and has_ema
        if request.use_ema and not has_ema and env.rank == 0:
            print(f"{ckpt} holds no EMA weights: evaluating the raw weights", file=sys.stderr)
        ema = EMA(pm.model, 0.0) if use_ema else None
        load_distributed_checkpoint(ckpt, model=pm.model, ema_shadow=ema.shadow if ema else None)
        scheduler = build_scheduler(cfg.diffusion)
        report = EvalReport(checkpoint=str(ckpt), step=checkpoint_step(ckpt), weights="ema" if use_ema else "raw",
                            scheduler=cfg.diffusion.scheduler, time_sampling=resolved_time_sampling(cfg.diffusion),
                            t_samples=request.t_samples, seed=request.seed, world_size=env.world_size,
                            layout={"tp": par.tp, "pp": par.pp, "dp_shard": par.dp_shard,
                                    "dp_replicate": par.dp_replicate})
        if corpora is None:
            sources = [lambda: _shard_data(request, vocab_size, batch_size)]
        else:
            tokenizer = get_tokenizer(cfg.data.tokenizer)
            if tokenizer.vocab_size + 1 != vocab_size:
                raise CheckpointError(f"checkpoint {ckpt}: its tokenizer {cfg.data.tokenizer} has "
                                      f"{tokenizer.vocab_size} ids but the model has {vocab_size - 1} (+ mask)")
            sources = [lambda c=c: _zero_shot_data(request, c, tokenizer, seq_len, batch_size) for c in corpora]
        swap = ema.swapped_in(pm.model) if ema is not None else contextlib.nullcontext()
        with swap:
            for source in sources:
                data = source()
                out = distributed_validation_nelbo(
                    pm, scheduler, data.batches, cfg=cfg.diffusion, seed=request.seed, device=device,
                    pad_id=data.pad_id, t_samples=request.t_samples,
                    autocast_dtype=resolve_autocast(cfg.train.precision, device),
                    progress=request.progress and env.rank == 0)
                report.results.append(DatasetResult(
                    dataset=data.name, split=data.split, rows=data.batches.count, tokens=int(out["val_tokens"]),
                    nelbo=out["val_nelbo"], nelbo_se=out["val_nelbo_se"], l_main=out["val_l_main"],
                    l_velocity=out["val_l_velocity"], ppl=out["val_ppl"]))
        clean = True
        return report
    finally:
        if owns_group:
            shutdown_process_group(clean=clean)


def format_table(report: EvalReport) -> str:
    """The papers' table (data set, tokens, perplexity) with the bound's parts and its error."""
    names = [("/".join(Path(r.dataset).parts[-3:-1]) if os.sep in r.dataset else r.dataset)   # a manifest's folders
             for r in report.results]
    width = max([len("dataset"), *map(len, names)]) + 2
    head = (f"{'dataset':<{width}}{'split':<12}{'rows':>8}{'tokens':>11}{'NELBO/tok':>11}{'SE':>9}{'L_main':>9}"
            f"{'L_velocity':>12}{'PPL <=':>11}")
    lines = [f"checkpoint {report.checkpoint} (step {report.step}, {report.weights} weights, scheduler "
             f"{report.scheduler}, {report.time_sampling} t, {report.t_samples} t-sample"
             f"{'s' if report.t_samples != 1 else ''}/row, seed {report.seed}, {report.world_size} process"
             f"{'es' if report.world_size != 1 else ''})", head]
    for name, r in zip(names, report.results):
        ppl = f"{r.ppl:.2f}" if math.isfinite(r.ppl) and r.ppl < 1e9 else f"{r.ppl:.3g}"
        lines.append(f"{name:<{width}}{r.split:<12}{r.rows:>8}{r.tokens:>11}{r.nelbo:>11.4f}{r.nelbo_se:>9.4f}"
                     f"{r.l_main:>9.4f}{r.l_velocity:>12.5f}{ppl:>11}")
    return "\n".join(lines)
