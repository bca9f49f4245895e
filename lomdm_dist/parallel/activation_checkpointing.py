"""Activation checkpointing and ``torch.compile``, per DiT block.

Both use APIs that leave parameter names alone: the composable ``checkpoint`` (module hooks, no
wrapper module that would prefix names with ``_checkpoint_wrapped_module``) and
``nn.Module.compile`` (compiles the module's forward in place, no ``_orig_mod`` prefix).

``selective`` checkpoints every other backbone block (torchtitan's layer-selective mode): about
half the activation memory is recomputed, at half the recompute cost of ``full``.
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint

from ..model import DiTBlock


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = [block for block in model.backbone.blocks if isinstance(block, DiTBlock)]
    for head in (model.phi, model.psi):
        if head is not None:
            blocks.append(head.block)
    return blocks


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """``none``, ``selective`` (every other backbone block) or ``full`` (every block, heads included)."""
    if mode == "none":
        return
    if mode not in ("selective", "full"):
        raise ValueError(f"parallel.activation_checkpointing must be none, selective or full, got {mode!r}")
    for index, block in enumerate(model.backbone.blocks):
        if isinstance(block, DiTBlock) and (mode == "full" or index % 2 == 0):
            checkpoint(block)
    if mode == "full":
        for head in (model.phi, model.psi):
            if head is not None:
                checkpoint(head.block)


def apply_compile(model: nn.Module) -> None:
    """Compile each DiT block separately (blocks have one shape, so one graph serves them all)."""
    for block in _blocks(model):
        block.compile()
