"""Streaming load: a saved transformers model built on the meta device and filled tensor by
tensor from its safetensors files, the experts quantised as they arrive, each rank's experts
only under expert parallelism.

    stream_model(model_dir, config, dtype, quantize=None, shard=None, dequantize=False,
                 dense_shard=None) -> (model, None) or (None, why not: the caller loads
                                        with transformers then)

A stacked expert tensor is read one expert at a time: with `quantize` ("nf4", "int8") each is
quantised as it is read into the stack's quantised storage (`moekit.quant`: one float scratch
reused), so the stack never exists in the compute dtype; with `shard` (first expert, count)
only those rows are read (safetensors slices), the rest of the stack never leaves the file.
Such a tensor's parameter is then a one-element stand-in expanded to the full stack's shape
and dtype (PEFT sizes an adapter for every expert from it); the rows live beside it (`LOCAL`
in the module's `__dict__`, or the quantised buffers `<name>_qdata`/`_qscales` under
`QUANT_SPEC`) and `expert_parallel` installs them.
Where each tensor is in the files: `hf.checkpoint` (re-exported here).
With `dense_shard` (rank, ranks of FSDP2) every other weight holds only the rows
`fully_shard` keeps on that rank (`_fsdp_rows`).
The digest of each expert's rows as read (`DIGESTS`) is kept for `hf.verify`, which compares
it with the files independently of this reader.

Peak host memory is about the final model plus one expert (two, quantising), never the
model in the compute dtype beside its quantised form. Families whose checkpoint conversions
are other than renamings and expert merges (transposes, splits) are not mapped: the caller
falls back to transformers' loader.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ..quant import SCHEMES, QuantizedExperts
from .checkpoint import CheckpointMap, checkpoint_map, digest
from .experts import QUANT_SPEC, layout_of
from .patch import experts_of, holds_experts

__all__ = [
    "DIGESTS",
    "LOCAL",
    "SHARD",
    "CheckpointMap",
    "checkpoint_map",
    "digest",
    "is_stand_in",
    "stacked_names",
    "stream_model",
]

log = logging.getLogger(__name__)

LOCAL = "_moekit_local"  # {name: this rank's rows [n, a, b]} behind a stand-in parameter
SHARD = "_moekit_shard"  # (first expert, count, E): the experts a module's rows are
DIGESTS = "_moekit_digests"  # {name: [sha256 of each local expert's rows as read]}


def is_stand_in(t: Tensor) -> bool:
    """Whether `t` is a stand-in of a stacked tensor: one element expanded (no memory)."""
    return t.dim() > 0 and t.numel() > 1 and all(s == 0 for s in t.stride())


def stacked_names(experts: nn.Module) -> list[str]:
    """The experts module's tensors stacked over experts (dim 0 = E): weights, biases."""
    layout = layout_of(experts)
    names = [layout.up_name, "down_proj"]
    if layout.has_bias:
        names += [f"{layout.up_name}_bias", "down_proj_bias"]
    return names


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and their buffers (RoPE
    frequencies, computed in `__init__`, not stored) real."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _meta_model(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with _params_on_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoModelForCausalLM.from_config(
                config, dtype=dtype, experts_implementation="moekit"
            )
        except (ValueError, TypeError) as error:  # a family off the interface takes no backend
            if "experts_implementation" not in str(error) and "moekit" not in str(error):
                raise
            return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _experts_modules(model: nn.Module) -> dict[int, nn.Module]:
    found = {}
    for block in (m for m in model.modules() if holds_experts(m)):
        experts = experts_of(block)
        if experts is not None and hasattr(experts, "has_gate"):
            found[id(experts)] = experts
    return found


def _stand_in(shape, dtype: torch.dtype, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(torch.zeros((), dtype=dtype).expand(shape), requires_grad=requires_grad)


def _read_rows(cmap: CheckpointMap, name: str, e: int) -> Tensor:
    """Expert e's rows of `name` as the loader reads them (tests inject faults here)."""
    return cmap.rows(name, e)


def _expert(cmap: CheckpointMap, name: str, e: int, full: Tensor, hashes: list[str]) -> Tensor:
    """Expert e's rows of `name` in `full`'s dtype, their digest (as stored) into `hashes`."""
    rows = _read_rows(cmap, name, e)
    if tuple(rows.shape) != tuple(full.shape[1:]):
        raise ValueError(
            f"{name}: expert {e} is {tuple(rows.shape)} in {cmap.where(name)}, the model "
            f"expects {tuple(full.shape[1:])}"
        )
    hashes.append(digest(rows))
    return rows.to(full.dtype)


def _fill_mxfp4(
    experts: nn.Module,
    name: str,
    full_name: str,
    cmap: CheckpointMap,
    shard: tuple[int, int],
    hashes: list[str],
) -> None:
    """A stacked weight the checkpoint stores in MXFP4, kept so (`quant`'s "mxfp4")."""
    layout, full = layout_of(experts), experts._parameters[name]
    num_experts, a, b = full.shape
    d_in, d_out = (a, b) if layout.is_transposed else (b, a)  # the bank's [E, d_in, d_out]
    codes, exponents = [], []
    for e in range(shard[0], shard[0] + shard[1]):
        blocks, scales = cmap.mxfp4_expert(full_name, e)
        if blocks.shape != (d_out, d_in // 2) or scales.shape != (d_out, d_in // 32):
            raise ValueError(
                f"{full_name}: expert {e}'s MXFP4 blocks {tuple(blocks.shape)} and scales "
                f"{tuple(scales.shape)} in {cmap.where(full_name)} do not hold a "
                f"[{d_in}, {d_out}] weight"
            )
        hashes.append(digest(torch.cat([blocks.reshape(-1), scales.reshape(-1)])))
        codes.append(blocks)
        exponents.append(scales)
    experts.register_buffer(f"{name}_qdata", torch.stack(codes))
    experts.register_buffer(f"{name}_qscales", torch.stack(exponents))
    spec = ("mxfp4", (shard[1], d_in, d_out), full.dtype)
    experts.__dict__.setdefault(QUANT_SPEC, {})[name] = spec
    experts._parameters[name] = _stand_in(full.shape, full.dtype, False)


def _dequantized_mxfp4(
    experts: nn.Module, name: str, full_name: str, cmap: CheckpointMap, shard: tuple[int, int]
) -> Tensor:
    """The rows of a stacked weight stored in MXFP4, dequantised an expert at a time into
    the parameter's layout and dtype."""
    from ..quant import _mxfp4_expert

    layout, full = layout_of(experts), experts._parameters[name]
    rows = torch.empty((shard[1], *full.shape[1:]), dtype=full.dtype)
    for i, e in enumerate(range(shard[0], shard[0] + shard[1])):
        weight = _mxfp4_expert(*cmap.mxfp4_expert(full_name, e), full.dtype)  # [d_in, d_out]
        rows[i] = weight if layout.is_transposed else weight.T
    return rows


def _fill_experts(
    experts: nn.Module,
    prefix: str,
    cmap: CheckpointMap,
    quantize: str | None,
    shard: tuple[int, int] | None,
    dequantize: bool = False,
) -> None:
    """Each stacked tensor of an experts module, read one expert (a few) at a time."""
    layout = layout_of(experts)
    for name in stacked_names(experts):
        full = experts._parameters[name]  # meta [E, a, b] (or [E, b]: a bias)
        num_experts, dtype = full.shape[0], full.dtype
        first, count = shard if shard is not None else (0, num_experts)
        hashes: list[str] = []

        def read(e: int, name=name, full=full, hashes=hashes) -> Tensor:
            return _expert(cmap, f"{prefix}{name}", e, full, hashes)

        experts.__dict__.setdefault(DIGESTS, {})[name] = hashes
        experts.__dict__[SHARD] = (first, count, num_experts)
        if f"{prefix}{name}" in cmap.mxfp4 and not dequantize:
            _fill_mxfp4(experts, name, f"{prefix}{name}", cmap, (first, count), hashes)
            continue
        if quantize is not None and name in (layout.up_name, "down_proj"):
            a, b = full.shape[1:]
            shape = (count, a, b) if layout.is_transposed else (count, b, a)  # [E, in, out]
            quant = QuantizedExperts.empty(quantize, shape, dtype)
            rows = (read(e) for e in range(first, first + count))  # [a, b] each
            quant.fill(0, rows if layout.is_transposed else (w.T for w in rows))
            experts.register_buffer(f"{name}_qdata", quant.data)
            experts.register_buffer(f"{name}_qscales", quant.scales)
            experts.__dict__.setdefault(QUANT_SPEC, {})[name] = (quantize, shape, dtype)
            experts._parameters[name] = _stand_in(full.shape, dtype, False)
            continue
        if f"{prefix}{name}" in cmap.mxfp4:  # dequantised: a plain weight
            rows = _dequantized_mxfp4(experts, name, f"{prefix}{name}", cmap, (first, count))
            experts.__dict__[DIGESTS].pop(name)  # nothing as stored to compare it with
        else:
            rows = torch.empty((count, *full.shape[1:]), dtype=dtype)
            for i, e in enumerate(range(first, first + count)):
                rows[i] = read(e)
        if count == num_experts:
            experts._parameters[name] = nn.Parameter(rows, requires_grad=full.requires_grad)
        else:  # this rank's rows behind a stand-in of the stack; `expert_parallel` installs
            experts.__dict__.setdefault(LOCAL, {})[name] = rows
            experts._parameters[name] = _stand_in(full.shape, dtype, full.requires_grad)


def _fsdp_rows(
    cmap: CheckpointMap, key: str, param: Tensor, dense_shard: tuple[int, int]
) -> Tensor:
    """A parameter of which only the rows FSDP2 keeps on rank `dense_shard[0]` of
    `dense_shard[1]` are read (dim 0 cut in chunks of ceil(n / ranks), as `fully_shard` cuts
    it). The rest of the tensor is allocated, never written: its pages are never touched, so
    they never become resident, and `fully_shard` copies out this rank's chunk and drops it."""
    rank, ranks = dense_shard
    rows = param.shape[0]
    size = -(-rows // ranks)
    first, last = min(rank * size, rows), min((rank + 1) * size, rows)
    value = torch.empty(param.shape, dtype=param.dtype)
    if last > first:
        value[first:last] = cmap.rows_of(key, first, last).to(param.dtype)
    return value


def stream_model(
    model_dir: Path,
    config,
    dtype: torch.dtype,
    quantize: str | None = None,
    shard: tuple[int, int] | None = None,
    dequantize: bool = False,
    dense_shard: tuple[int, int] | None = None,
) -> tuple[nn.Module | None, str | None]:
    """The causal LM of `model_dir` read tensor by tensor (module docstring); (None, why)
    where its checkpoint is not mapped (`checkpoint_map`).

    Args:
        quantize: "nf4" or "int8": the experts' up and down projections stored so as they
            are read (`hf.quantize`'s buffers), the parameters stand-ins.
        shard: (rank, ranks) of an expert-parallel group: rank's E / ranks experts of every
            MoE block only.
        dequantize: experts the checkpoint stores in MXFP4 dequantised into plain weights
            (an expert at a time; the config then says nothing of quantisation), not kept so.
        dense_shard: (rank, ranks) of FSDP2's data-parallel group: of every parameter outside
            the experts only the rows FSDP2 keeps on this rank (`_fsdp_rows`); the model is
            fit for `fully_shard` over that group and nothing else.
    """
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(
            f"--quantize-experts must be one of {', '.join(SCHEMES)}, got {quantize!r}"
        )
    model = _meta_model(config, dtype)
    cmap = checkpoint_map(model, Path(model_dir))
    if isinstance(cmap, str):
        return None, cmap
    experts_modules = _experts_modules(model)
    with cmap.opened():
        for prefix, module in model.named_modules():
            prefix = f"{prefix}." if prefix else ""
            if id(module) in experts_modules:
                local = None
                if shard is not None:
                    size = module.down_proj.shape[0] // shard[1]
                    local = (shard[0] * size, size)
                _fill_experts(module, prefix, cmap, quantize, local, dequantize)
            for name, param in list(module._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                key = cmap.dense.get(f"{prefix}{name}")
                if key is None:
                    continue  # tied: set by `tie_weights` below
                if dense_shard is None or id(module) in experts_modules or param.dim() == 0:
                    value = cmap.tensor(key).to(param.dtype)
                else:
                    value = _fsdp_rows(cmap, key, param, dense_shard)
                module._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
            for name, buffer in list(module._buffers.items()):
                key = cmap.dense.get(f"{prefix}{name}")
                if buffer is not None and key is not None:
                    module._buffers[name] = cmap.tensor(key).to(buffer.dtype)
    if cmap.mxfp4 and dequantize:
        model.config.quantization_config = None
        del model.config.quantization_config
    elif cmap.mxfp4:
        log.warning(
            "%d expert weights read as stored in MXFP4 (kept so, dequantised an expert at a "
            "time); the other weights in %s",
            len(cmap.mxfp4),
            dtype,
        )
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"--model {model_dir}: no weights in the files for {left[0]}")
    model.eval()
    return model, None
