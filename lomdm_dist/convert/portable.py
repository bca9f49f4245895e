"""The in-memory form every conversion goes through: one set of full weights plus what rebuilds the model.

Each reader (a sharded training checkpoint, a consolidated ``model.safetensors`` + ``config.json``,
an MDLM checkpoint) produces a :class:`PortableModel`; each writer takes one. So any source reaches
any target, and the checks that a set of tensors fits the model its config describes live in one
place (:func:`check_tensors`), naming the file, the key and both shapes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..config import Config, config_to_dict, load_config
from ..model import build_model


class ConversionError(ValueError):
    """A source cannot be converted or a target cannot be written; the message names the file and
    what is wrong (missing key, shape mismatch, unreadable file, unsupported setting)."""


@dataclass
class PortableModel:
    tensors: dict[str, torch.Tensor]
    """Full weights keyed by this project's parameter names (``backbone.*``, ``phi.*``, ``psi.*``)."""
    config: Config
    """The training config the weights belong to (model and diffusion sections rebuild the model)."""
    vocab_size: int
    """Rows of the embedding, mask token included (its id is ``vocab_size - 1``)."""
    tokenizer: str | None
    weights: str
    """``ema`` or ``raw``: which of the source's weight sets these are."""
    step: int
    """Training step of the source (0 for an imported model)."""
    source: dict = field(default_factory=dict)
    """Provenance written into config.json / meta.json (path, format, anything else worth keeping)."""


def config_from_yaml_text(text: str, origin: str | os.PathLike) -> Config:
    """Parse and validate a config saved as YAML text (a checkpoint's ``config.yaml``)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        return load_config(path)
    except Exception as err:
        raise ConversionError(f"{origin}: the saved config is not valid: {err}") from None
    finally:
        os.unlink(path)


def config_from_dict(tree: dict, origin: str | os.PathLike) -> Config:
    """A validated :class:`Config` from a nested dict (a config.json's ``training_config``)."""
    return config_from_yaml_text(yaml.safe_dump(tree, sort_keys=False), origin)


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def expected_shapes(cfg: Config, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model ``cfg`` describes (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.diffusion, vocab_size)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                  origin: str | os.PathLike, *, what: str = "key") -> None:
    """Raise :class:`ConversionError` unless ``tensors`` has exactly the expected names and shapes."""
    missing = [name for name in expected if name not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{origin}: missing {what} {missing[0]}{more}")
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"{origin}: unexpected {what} {unexpected[0]}{more}: the model the config "
                              f"describes has no such parameter")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ConversionError(f"{origin}: shape mismatch for {name}: expected {shape}, got {got}")
    for name, value in tensors.items():
        if not value.is_floating_point():
            raise ConversionError(f"{origin}: {name} has dtype {value.dtype}, expected a floating-point tensor")


def fresh_model_tensors(cfg: Config, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter of a freshly initialised model (initial values are a function of ``seed``)."""
    model = build_model(cfg.model, cfg.diffusion, vocab_size, seed=seed)
    return {name: p.detach() for name, p in model.named_parameters()}


def resolve_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"{p}: no such file or directory")
    return p
