"""Reading the files MDLM (kuleshov-group/mdlm) leaves behind, without MDLM's code.

Three forms carry the same parameter names (``docs/mdlm-import.md``):

- the Lightning ``.ckpt``: ``state_dict`` with every backbone tensor under ``backbone.``, and, when
  MDLM trained with an EMA, ``ema`` = ``{decay, num_updates, shadow_params}`` where
  ``shadow_params`` is a *list* in the order of ``backbone.parameters()``;
- a plain state dict saved with ``torch.save`` (``.pt`` / ``.bin``), with or without the prefix;
- a safetensors file with the same names, with or without the prefix.

The ``.ckpt`` also pickles MDLM's hydra config (omegaconf) and its tokenizer under
``hyper_parameters``. PyTorch's safe loader refuses such classes; rather than import omegaconf and
transformers and run arbitrary pickled code, every class the safe loader does not know is replaced
by an inert :class:`_Opaque` placeholder (``torch.serialization.get_unsafe_globals_in_checkpoint``
lists them, ``safe_globals`` admits the placeholders), so nothing from the file executes. The
config's values survive in the placeholders' pickled state; :func:`plain_config` reads them back
where the layout is omegaconf's (``_content`` of containers, ``_val`` of value nodes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .portable import ConversionError, resolve_file

PREFIX = "backbone."


class _Opaque:
    """Stands in for a pickled object of a class that is not needed here; keeps its state as data."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Opaque":
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass                        # inert on purpose: unpickling must run nothing of the file's classes

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


def _placeholder(qualified_name: str) -> tuple[type, str]:
    module, _, name = qualified_name.rpartition(".")
    return type(name or qualified_name, (_Opaque,), {"__module__": module, "__qualname__": name}), qualified_name


def load_torch_file(path: Path) -> Any:
    """``torch.load`` with PyTorch's safe loader; unknown classes become :class:`_Opaque` placeholders."""
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # zip/pickle errors: a truncated or foreign file
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    try:
        with torch.serialization.safe_globals([_placeholder(name) for name in unknown]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConversionError(f"{path}: cannot be loaded ({type(err).__name__}: {err})") from None


def plain_config(obj: Any, depth: int = 0) -> Any:
    """A placeholder-laden pickled config as plain dicts/lists/values (best effort, omegaconf-aware)."""
    if depth > 40:
        return None
    if isinstance(obj, _Opaque):
        state = obj.__dict__.get("_state")
        if isinstance(state, tuple) and state and isinstance(state[0], Mapping):
            state = state[0]
        if not isinstance(state, Mapping):
            return None
        if "_content" in state:        # omegaconf DictConfig / ListConfig
            return plain_config(state["_content"], depth + 1)
        if "_val" in state:            # omegaconf value node
            return plain_config(state["_val"], depth + 1)
        return {k: plain_config(v, depth + 1) for k, v in state.items() if not str(k).startswith("_")}
    if isinstance(obj, Mapping):
        return {k: plain_config(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v, depth + 1) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return None


@dataclass
class MdlmSource:
    path: Path
    kind: str
    """``lightning``, ``state_dict`` or ``safetensors``."""
    state: dict[str, torch.Tensor]
    """Backbone tensors (parameters and the rotary buffer) by MDLM name, prefix removed."""
    shadow: list[torch.Tensor] | None = None
    """The EMA's shadow parameters, in MDLM's parameter order (Lightning checkpoints only)."""
    config: dict = field(default_factory=dict)
    """MDLM's hydra config as plain data when the checkpoint carries a readable one, else empty."""
    step: int | None = None


def _strip_prefix(tensors: Mapping[str, Any], path: Path, *, lightning: bool) -> dict[str, torch.Tensor]:
    """Remove ``backbone.`` (required in a Lightning state_dict, optional elsewhere)."""
    prefixed = [key for key in tensors if key.startswith(PREFIX)]
    if lightning and not prefixed:
        raise ConversionError(f"{path}: state_dict has no {PREFIX}* keys: not an MDLM DiT checkpoint")
    if prefixed:
        stray = [key for key in tensors if not key.startswith(PREFIX)]
        if stray:
            raise ConversionError(f"{path}: unexpected key {stray[0]} (every other key is under {PREFIX})")
        tensors = {key[len(PREFIX):]: value for key, value in tensors.items()}
    out = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def read_mdlm_file(path: str | os.PathLike) -> MdlmSource:
    """Read an MDLM checkpoint in any of the three forms of the module docstring."""
    p = resolve_file(path)
    if p.is_dir():
        raise ConversionError(f"{p}: is a directory; --from mdlm takes a .ckpt, .pt/.bin or .safetensors file")
    if p.suffix == ".safetensors":
        try:
            tensors = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as err:
            raise ConversionError(f"{p}: not a readable safetensors file ({err})") from None
        return MdlmSource(path=p, kind="safetensors", state=_strip_prefix(tensors, p, lightning=False))
    obj = load_torch_file(p)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{p}: holds a {type(obj).__name__}, not a checkpoint dict or a state dict")
    if "state_dict" in obj:
        state = obj["state_dict"]
        if not isinstance(state, Mapping):
            raise ConversionError(f"{p}: state_dict is a {type(state).__name__}, not a mapping")
        shadow = None
        ema = obj.get("ema")
        if ema is not None:
            shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
            if not isinstance(shadow, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in shadow):
                raise ConversionError(f"{p}: the ema entry has no list of tensors under shadow_params")
            shadow = list(shadow)
        hparams = obj.get("hyper_parameters")
        config = plain_config(hparams.get("config")) if isinstance(hparams, Mapping) else None
        step = obj.get("global_step")
        return MdlmSource(path=p, kind="lightning", state=_strip_prefix(state, p, lightning=True), shadow=shadow,
                          config=config if isinstance(config, dict) else {},
                          step=int(step) if isinstance(step, int) else None)
    return MdlmSource(path=p, kind="state_dict", state=_strip_prefix(obj, p, lightning=False))
