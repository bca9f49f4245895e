"""Parameter initialisation as a pure function of (seed, parameter name): any piece of any parameter.

Why not ``torch.manual_seed`` followed by the modules' own ``reset_parameters``: that fills the
parameters in construction order from one generator, so a value depends on everything built
before it, and the only way to get one rank's shard is to build (and hold) the whole model first.
Here every parameter has its own stream, keyed by the seed and its name (names are the same in
every layout: pipeline stages keep the full model's names, tensor parallelism and FSDP keep them
too). The stream is cut into blocks of whole rows (dim 0), each with its own generator, so the
rows a shard needs are generated without the rows it does not need: a model built on the meta
device can be laid out first and then each rank fills only its own shard
(``lomdm_dist/parallel/materialize.py``), with values equal to those of the one-process model.

Which distribution a parameter gets comes from its module (``init_plan``): Linear weights and
biases are uniform in +-1/sqrt(fan_in) (PyTorch's default), the embedding uniform in
+-1/sqrt(d_model) (MDLM's ``kaiming_uniform_(a=sqrt(5))``), norm weights one, and every submodule a
module lists in its ``zero_init`` attribute (adaLN modulations, the output projection, the head's
read-out) zero.

Values are drawn on the CPU in float32 whatever the parameter's device, so a GPU run starts from
the same weights as a CPU run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

# Elements per generator block: large enough that creating a generator (a few microseconds) is
# negligible next to filling the block, small enough that a shard of a few rows does not
# generate much more than it keeps. Changing it changes every initial value.
BLOCK_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class ParamInit:
    """How one parameter starts: ``uniform`` in [-bound, bound), or constant ``zeros`` / ``ones``."""

    kind: Literal["uniform", "zeros", "ones"]
    bound: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "zeros", "ones"):
            raise ValueError(f"ParamInit kind must be uniform, zeros or ones, got {self.kind!r}")
        if self.kind == "uniform" and not self.bound > 0:
            raise ValueError(f"a uniform ParamInit needs a positive bound, got {self.bound}")


ZEROS = ParamInit("zeros")
ONES = ParamInit("ones")


def _default_init(module: nn.Module, local_name: str) -> ParamInit | None:
    if isinstance(module, nn.Linear) and local_name in ("weight", "bias"):
        return ParamInit("uniform", module.in_features ** -0.5)
    if isinstance(module, nn.Embedding) and local_name == "weight":
        return ParamInit("uniform", module.embedding_dim ** -0.5)
    if isinstance(module, nn.LayerNorm):
        return ONES if local_name == "weight" else ZEROS if local_name == "bias" else None
    return None


def init_plan(model: nn.Module) -> dict[str, ParamInit]:
    """The initialisation of every parameter of ``model``, keyed by its name.

    Works on a model in any state (meta device, pipeline-pruned, tensor-parallel, FSDP-wrapped):
    it reads module types and attributes (``in_features``, ``embedding_dim``, ``zero_init``), which
    laying out a model does not change. Raises ``ValueError`` naming a parameter it has no rule for.
    """
    zero: set[str] = set()
    for prefix, module in model.named_modules():
        for child in getattr(module, "zero_init", ()):
            sub = getattr(module, child)
            if sub is None:
                continue
            base = f"{prefix}.{child}" if prefix else child
            zero.update(f"{base}.{name}" for name, _ in sub.named_parameters())
    plan: dict[str, ParamInit] = {}
    for prefix, module in model.named_modules():
        for local_name, _ in module.named_parameters(recurse=False):
            name = f"{prefix}.{local_name}" if prefix else local_name
            spec = ZEROS if name in zero else _default_init(module, local_name)
            if spec is None:
                raise ValueError(f"no initialisation rule for parameter {name} of {type(module).__name__}: "
                                 "add one to lomdm_dist/model/init.py")
            plan[name] = spec
    return plan


def block_seed(seed: int, name: str, block: int) -> int:
    """Seed of the generator of rows block ``block`` of parameter ``name`` (a stable 64-bit hash)."""
    digest = hashlib.blake2b(f"{int(seed)}\0{name}\0{int(block)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def rows_per_block(shape: Sequence[int]) -> int:
    """Rows (entries of dim 0) per generator block of a parameter of ``shape``; a function of the
    full shape only, so every layout cuts the stream at the same rows."""
    row = 1
    for size in shape[1:]:
        row *= int(size)
    return max(1, BLOCK_ELEMENTS // max(row, 1))


def fill_shard_(out: Tensor, spec: ParamInit, *, seed: int, name: str, global_shape: Sequence[int],
                offset: Sequence[int] | None = None) -> Tensor:
    """Fill ``out`` in place with the entries ``[offset[d], offset[d] + out.shape[d])`` (every dim d) of
    the full parameter ``name`` of ``global_shape``; returns ``out``.

    Generates only the row blocks that overlap the shard, one at a time, so the extra memory is one
    block however large the parameter. ``offset`` None: ``out`` is the whole parameter.
    """
    global_shape = tuple(int(s) for s in global_shape)
    offset = tuple(0 for _ in global_shape) if offset is None else tuple(int(o) for o in offset)
    if len(offset) != len(global_shape) or out.dim() != len(global_shape):
        raise ValueError(f"{name}: shard of {out.dim()} dims with offset {offset} for a parameter of shape "
                         f"{global_shape}")
    for dim, (start, size, full) in enumerate(zip(offset, out.shape, global_shape)):
        if start < 0 or start + size > full:
            raise ValueError(f"{name}: shard [{start}, {start + size}) of dim {dim} lies outside the parameter's "
                             f"shape {global_shape}")
    with torch.no_grad():
        if spec.kind != "uniform" or out.numel() == 0:
            return out.fill_(0.0 if spec.kind == "zeros" else 1.0) if out.numel() else out
        if not global_shape:                                    # a scalar parameter: one block of one row
            values = torch.empty((), dtype=torch.float32)
            values.uniform_(-spec.bound, spec.bound, generator=torch.Generator().manual_seed(block_seed(seed, name, 0)))
            return out.copy_(values)
        per_block = rows_per_block(global_shape)
        row_shape = global_shape[1:]
        inner = tuple(slice(o, o + s) for o, s in zip(offset[1:], out.shape[1:]))
        first, stop = offset[0], offset[0] + out.shape[0]
        for block in range(first // per_block, -(-stop // per_block)):
            lo, hi = block * per_block, min((block + 1) * per_block, global_shape[0])
            generator = torch.Generator().manual_seed(block_seed(seed, name, block))
            values = torch.empty((hi - lo, *row_shape), dtype=torch.float32)
            values.uniform_(-spec.bound, spec.bound, generator=generator)
            keep_lo, keep_hi = max(lo, first), min(hi, stop)
            out[keep_lo - first:keep_hi - first].copy_(values[(slice(keep_lo - lo, keep_hi - lo), *inner)])
    return out


def init_parameters_(model: nn.Module, seed: int, plan: Mapping[str, ParamInit] | None = None) -> None:
    """Initialise the (whole, unsharded) parameters of ``model`` in place from ``seed``.

    ``plan``: which parameters to fill and how (default: :func:`init_plan`, every parameter); a
    partial plan leaves the other parameters alone. Names are relative to ``model``: initialise the
    root model so they match a sharded copy's.
    """
    plan = init_plan(model) if plan is None else plan
    params = dict(model.named_parameters())
    unknown = sorted(set(plan) - set(params))
    if unknown:
        raise ValueError(f"init plan names parameters the model does not have: {', '.join(unknown[:5])}")
    for name, spec in plan.items():
        param = params[name]
        if param.is_meta:
            raise ValueError(f"parameter {name} is on the meta device: call model.to_empty(device=...) first")
        fill_shard_(param.data, spec, seed=seed, name=name, global_shape=param.shape)
