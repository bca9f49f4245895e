"""What changed in a run's configuration between its starts, and whether a checkpoint can go on under it.

A second start on the same ``run.dir`` resumes from the latest checkpoint with whatever config it
is given. Some differences are ordinary (more steps, another learning rate, other eval settings,
another parallel layout); others make the saved state mean something else or not fit at all
(another model shape, scheduler family, exponent range, row length, tokenizer, data set or seed).
:func:`check_resume` compares the new config with the one the checkpoint was written under: it
returns the ordinary changes (the trainer prints them) and raises a :class:`ConfigError` naming
the others, unless ``run.allow_config_change`` is true.

:func:`record_config` keeps the history: ``config.yaml`` in the run directory is always the current
config, and ``configs/config-<step>-<time>.yaml`` holds every config the run has started with (a
new file only when the config differs from the previous one), each headed by comments that say
from which step it applied and what changed. ``diff`` between two of them shows the rest.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError

HISTORY_DIR = "configs"
IGNORED = frozenset({"run.dir", "run.allow_config_change"})
"""Keys never compared: the directory is the run by definition, and the override flag is per start."""

_MODEL = "model shape or architecture: the saved weights do not fit it or mean something else"
_DATA_ORDER = "the saved data position indexes the old sample order"
INCOMPATIBLE: dict[str, str] = {
    "model.n_layers": _MODEL, "model.d_model": _MODEL, "model.n_heads": _MODEL, "model.cond_dim": _MODEL,
    "model.mlp_ratio": _MODEL, "model.head_mlp_hidden": _MODEL, "model.time_conditioning": _MODEL,
    "model.rope_base": _MODEL,
    "diffusion.scheduler": "scheduler family: the phi/psi heads and what the model learned belong to the old one",
    "diffusion.c1": "the learned exponents k = c1 + c2 NormSig(g) were trained for the old range",
    "diffusion.c2": "the learned exponents k = c1 + c2 NormSig(g) were trained for the old range",
    "diffusion.block_size": "block diffusion's blocks define the generation order the model learned",
    "data.seq_len": "row length: the model, the data rows and their saved position were built for the old one",
    "data.tokenizer": "vocabulary: the embedding and output layers belong to the old tokenizer",
    "data.source": "another training set: " + _DATA_ORDER,
    "data.path": "another training set: " + _DATA_ORDER,
    "data.val_docs": "another train/validation split: " + _DATA_ORDER,
    "train.seed": "the data order and every random draw are keyed by the seed: " + _DATA_ORDER,
}
"""Keys a checkpoint cannot simply continue under, with the reason shown to the user. Every other
key (steps, intervals, learning rate, optimizer settings, dropout, eval and sample settings,
precision, threads, parallel layout, ...) may change between starts."""

OVERRIDE_HINT = ("start a new run (another run.dir), set these keys back, or add run.allow_config_change=true "
                 "to resume anyway")


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    reason: str | None = None
    """Why the checkpoint cannot continue under this change; None for an ordinary change."""

    def describe(self) -> str:
        text = f"{self.key}: {_show(self.old)} -> {_show(self.new)}"
        return f"{text} ({self.reason})" if self.reason else text


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = list(value) if isinstance(value, tuple) else value
    return flat


def compare_configs(old: dict, new: dict) -> list[Change]:
    """Every dotted key whose value differs between two config trees, in the new tree's order.

    A key absent from ``old`` (a config written before the key existed) counts as an ordinary change.
    """
    flat_old, flat_new = _flatten(old or {}), _flatten(new or {})
    changes = []
    for key in [*flat_new, *(k for k in flat_old if k not in flat_new)]:
        if key in IGNORED:
            continue
        before, after = flat_old.get(key, _ABSENT), flat_new.get(key, _ABSENT)
        if before == after:
            continue
        reason = INCOMPATIBLE.get(key) if before is not _ABSENT and after is not _ABSENT else None
        changes.append(Change(key, before, after, reason))
    return changes


def read_config_tree(path: Path) -> dict | None:
    """A config YAML as a plain tree, None when the file is missing or unreadable."""
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return tree if isinstance(tree, dict) else None


def check_resume(checkpoint: Path | None, new: dict, *, allow: bool) -> list[Change]:
    """The changes from the config ``checkpoint`` was written under to ``new`` (empty without a checkpoint).

    Raises :class:`ConfigError` listing the incompatible ones (see :data:`INCOMPATIBLE`) unless
    ``allow``; with ``allow`` they are returned like the others, their reasons kept for the notes.
    """
    if checkpoint is None:
        return []
    old = read_config_tree(checkpoint / "config.yaml")
    if old is None:
        return []
    changes = compare_configs(old, new)
    refused = [c for c in changes if c.reason]
    if refused and not allow:
        lines = "\n".join(f"  {c.describe()}" for c in refused)
        raise ConfigError(f"cannot resume {checkpoint} with a changed configuration:\n{lines}\n{OVERRIDE_HINT}")
    return changes


def describe_changes(changes: list[Change], checkpoint: Path, step: int) -> str:
    """The console note for a resume with changed settings."""
    lines = [f"config changed since the checkpoint at step {step} ({checkpoint}):"]
    for change in changes:
        if change.reason:
            lines.append(f"  {change.key}: {_show(change.old)} -> {_show(change.new)} "
                         f"(accepted because run.allow_config_change=true; {change.reason})")
        else:
            lines.append(f"  {change.describe()}")
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_config(run_dir: str | os.PathLike, tree: dict, *, step: int, now: float | None = None) -> Path | None:
    """Make ``tree`` the run's ``config.yaml`` and keep it in ``configs/`` when it differs from the previous one.

    Returns the new history file, or None when the config is unchanged (nothing added). The file's
    header comments name the step the config applies from, the time, and the changed keys.
    """
    run_dir = Path(run_dir)
    body = yaml.safe_dump(tree, sort_keys=False)
    current = run_dir / "config.yaml"
    previous = read_config_tree(current)
    changes = compare_configs(previous, tree) if previous is not None else None
    history = run_dir / HISTORY_DIR
    entry = None
    if changes is None or changes or not any(history.glob("config-*.yaml")):
        now = time.time() if now is None else now
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now))
        entry = history / f"config-{step:08d}-{stamp}.yaml"
        n = 1
        while entry.exists():
            entry = history / f"config-{step:08d}-{stamp}-{n}.yaml"
            n += 1
        header = [f"# config of {run_dir} from step {step}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}"]
        if changes is None:
            header.append("# the first config of this run directory")
        else:
            header.append("# changes from the previous config:" if changes else "# no change from the previous config")
            header.extend(f"#   {c.key}: {_show(c.old)} -> {_show(c.new)}" for c in changes)
        _atomic_write(entry, "\n".join(header) + "\n" + body)
    _atomic_write(current, body)
    return entry
