"""Runs from elsewhere: makeMoE's weights -> moekit's model; a dense run -> its upcycled MoE run.

makeMoE state_dict (per-head q/k/v, a ModuleList of experts, noisy router) -> the config read off
the tensor shapes -> q/k/v fused, experts stacked -> `SparseMoELanguageModel` with equal logits.
A checkpoint of the dense char LM (num_experts=1) -> `moekit.upcycle` to E experts -> a run
directory `moekit train --resume` continues from the dense step (optimizer state fresh).
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..train.files import encode_bytes, list_checkpoints, resolve_checkpoint, save_checkpoint
from ..train.loop import start_state
from ..upcycle import upcycle
from .config import TRAIN_FIELDS, TrainConfig
from .data import build_tokenizer, load_text
from .model import LMConfig, SparseMoELanguageModel


class _Reader:
    """Tensors of a makeMoE state_dict by key, shapes checked; it remembers what it took."""

    def __init__(self, state_dict: Mapping[str, Tensor]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to tensors, got {state_dict!r}")
        self.state_dict = state_dict
        self.taken: set[str] = set()

    def __call__(self, key: str, shape: tuple[int, ...] | None = None) -> Tensor:
        if key not in self.state_dict:
            raise ValueError(f"makeMoE state_dict: missing key {key!r}")
        tensor = self.state_dict[key]
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"makeMoE state_dict: {key!r} is a {type(tensor).__name__}, not a tensor"
            )
        if shape is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"makeMoE state_dict: {key!r} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        self.taken.add(key)
        return tensor

    def check_all_taken(self) -> None:
        extra = sorted(set(self.state_dict) - self.taken)
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ValueError(f"makeMoE state_dict: unexpected key {extra[0]!r}{more}")


def _count(keys, pattern: str) -> int:
    """1 + the largest index the pattern's group captures among the keys (0: none)."""
    found = [int(m.group(1)) for key in keys if (m := re.match(pattern, key))]
    return max(found) + 1 if found else 0


def makemoe_config(
    state_dict: Mapping[str, Tensor], *, top_k: int = 2, dropout: float = 0.1
) -> LMConfig:
    """The `LMConfig` of makeMoE weights: vocab, width, context, layers, heads and experts read
    off the tensors; `top_k` and `dropout` (not in the weights) as makeMoE's defaults."""
    read = _Reader(state_dict)
    for key in ("token_embedding_table.weight", "position_embedding_table.weight"):
        if read(key).dim() != 2:
            raise ValueError(
                f"makeMoE state_dict: {key!r} has shape {tuple(read(key).shape)}, "
                "expected 2 dimensions"
            )
    vocab_size, n_embed = read("token_embedding_table.weight").shape
    block_size = read("position_embedding_table.weight").shape[0]
    counts = {
        "n_layer": _count(state_dict, r"blocks\.(\d+)\."),
        "n_head": _count(state_dict, r"blocks\.0\.sa\.heads\.(\d+)\."),
        "num_experts": _count(state_dict, r"blocks\.0\.smoe\.experts\.(\d+)\."),
    }
    first_key = {
        "n_layer": "blocks.0.ln1.weight",
        "n_head": "blocks.0.sa.heads.0.query.weight",
        "num_experts": "blocks.0.smoe.experts.0.net.0.weight",
    }
    for name, count in counts.items():
        if count == 0:
            raise ValueError(f"makeMoE state_dict: missing key {first_key[name]!r}")
    return LMConfig(
        vocab_size=vocab_size,
        block_size=block_size,
        n_embed=n_embed,
        **counts,
        top_k=top_k,
        dropout=dropout,
        router="noisy",
        activation="relu",
        init="kaiming",
    )


def _convert_block(read: _Reader, i: int, cfg: LMConfig) -> dict[str, Tensor]:
    """One makeMoE block's tensors under moekit's names."""
    d, e, bs = cfg.n_embed, cfg.num_experts, cfg.block_size
    hd, h = d // cfg.n_head, 4 * d
    p = f"blocks.{i}."  # the same prefix in both models
    out = {
        f"{p}{ln}.{part}": read(f"{p}{ln}.{part}", (d,))
        for ln in ("ln1", "ln2")
        for part in ("weight", "bias")
    }

    def heads(kind: str) -> Tensor:  # [d, d]: head j's rows at j*hd, as moekit splits them
        return torch.cat(
            [read(f"{p}sa.heads.{j}.{kind}.weight", (hd, d)) for j in range(cfg.n_head)]
        )

    for j in range(cfg.n_head):  # the causal mask buffer, if saved: no information
        if f"{p}sa.heads.{j}.tril" in read.state_dict:
            read(f"{p}sa.heads.{j}.tril", (bs, bs))
    # makeMoE scales scores by 1/sqrt(n_embed), moekit by 1/sqrt(head_dim): fold the ratio into q
    query = heads("query")
    query = (query.double() * math.sqrt(hd / d)).to(query.dtype)
    out[f"{p}attn.qkv.weight"] = torch.cat([query, heads("key"), heads("value")])  # [3d, d]
    out[f"{p}attn.proj.weight"] = read(f"{p}sa.proj.weight", (d, d))
    out[f"{p}attn.proj.bias"] = read(f"{p}sa.proj.bias", (d,))
    for theirs, ours in (("topkroute_linear", "gate"), ("noise_linear", "noise_gate")):
        out[f"{p}moe.router.{ours}.weight"] = read(f"{p}smoe.router.{theirs}.weight", (e, d))
        out[f"{p}moe.router.{ours}.bias"] = read(f"{p}smoe.router.{theirs}.bias", (e,))

    def experts(layer: int, part: str, shape: tuple[int, ...]) -> Tensor:  # [E, *shape]
        return torch.stack(
            [read(f"{p}smoe.experts.{x}.net.{layer}.{part}", shape) for x in range(e)]
        )

    out[f"{p}moe.experts.w1"] = experts(0, "weight", (h, d)).transpose(1, 2)  # [E, d, h]
    out[f"{p}moe.experts.b1"] = experts(0, "bias", (h,))  # [E, h]
    out[f"{p}moe.experts.w2"] = experts(2, "weight", (d, h)).transpose(1, 2)  # [E, h, d]
    out[f"{p}moe.experts.b2"] = experts(2, "bias", (d,))  # [E, d]
    return out


def from_makemoe_state_dict(
    state_dict: Mapping[str, Tensor], *, top_k: int = 2, dropout: float = 0.1
) -> SparseMoELanguageModel:
    """makeMoE's model weights (its `state_dict()`, the keys of seed 003 and
    `moekit.bench.makemoe`) as a `SparseMoELanguageModel` that computes the same logits.

    Eval mode equals makeMoE's forward without routing noise (makeMoE draws it in eval too;
    moekit only in training). The config comes from the tensor shapes.

    Args:
        state_dict: makeMoE's `model.state_dict()` (e.g. `torch.load(path, weights_only=True)`).
        top_k: Experts per token, which the weights do not record (makeMoE's default 2).
        dropout: Dropout probability for further training (makeMoE's default 0.1).

    Returns:
        The model, in training mode (as a new module), on the CPU.

    Raises:
        ValueError: A missing, unexpected or wrongly shaped key (named), or top_k > experts.
        TypeError: `state_dict` is not a mapping of tensors.
    """
    config = makemoe_config(state_dict, top_k=top_k, dropout=dropout)
    read = _Reader(state_dict)
    d, v = config.n_embed, config.vocab_size
    converted = {
        "token_embedding_table.weight": read("token_embedding_table.weight", (v, d)),
        "position_embedding_table.weight": read(
            "position_embedding_table.weight", (config.block_size, d)
        ),
        "ln_f.weight": read("ln_f.weight", (d,)),
        "ln_f.bias": read("ln_f.bias", (d,)),
        "lm_head.weight": read("lm_head.weight", (v, d)),
        "lm_head.bias": read("lm_head.bias", (v,)),
    }
    for i in range(config.n_layer):
        converted |= _convert_block(read, i, config)
    read.check_all_taken()
    model = SparseMoELanguageModel.from_config(config)
    model.load_state_dict(converted)
    return model


def _check_new_run_dir(out: Path) -> None:
    if list_checkpoints(out):
        raise ValueError(f"--out {out} holds checkpoints already; give a new run directory")


def _save_run(out: Path, step: int, model, train_cfg: TrainConfig, state: dict) -> Path:
    """A checkpoint `moekit train --resume`, `generate` and `eval` read, with the fresh state
    of the optimizer `moekit train` builds."""
    from .train import make_optimizer  # here: the trainer's imports are not the library's

    optimizer = make_optimizer(model, train_cfg)
    state = {
        "train_config": train_cfg.to_dict(),
        "model_config": model.config.to_dict(),
        **state,
    }
    model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    return save_checkpoint(out, step, model_state, optimizer_state, state, train_cfg.keep)


def _job_state(data_rng: str, config: LMConfig) -> dict:
    """`LMJob.state()` of a run that has not stepped: its batch stream, no load counted."""
    zeros = [[0.0] * config.num_experts for _ in range(config.n_layer)]  # [L][E]
    return {"data": data_rng, "load_since_eval": zeros}


def load_makemoe(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state_dict saved with `torch.save(model.state_dict(), path)` (read without pickle code)."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ValueError(f"{path}: no such file") from err
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"{path}: not a state_dict saved with torch.save(model.state_dict(), path) ({err})"
        ) from err
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path}: holds a {type(state_dict).__name__}, not a state_dict")
    return state_dict


def import_makemoe(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data: str | None = None,
    top_k: int = 2,
    dropout: float = 0.1,
    seed: int = 1337,
) -> Path:
    """makeMoE weights saved with torch.save -> a moekit checkpoint (step 0) in run directory
    `out`, which `moekit generate`, `eval` and `train --resume` read.

    Args:
        path: The `.pt` file of makeMoE's `model.state_dict()`.
        out: A run directory without checkpoints.
        data: makeMoE's training text (default tinyshakespeare): its sorted characters are the
            vocabulary, which the weights do not record.
        top_k, dropout: As `from_makemoe_state_dict`.
        seed: Seed of the random streams a resumed run starts from.

    Returns:
        The checkpoint directory.
    """
    model = from_makemoe_state_dict(load_makemoe(path), top_k=top_k, dropout=dropout)
    tokenizer = build_tokenizer("char", load_text(data))
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"--data: {tokenizer.vocab_size} distinct characters, but the weights have "
            f"vocab_size={model.config.vocab_size}; pass the text makeMoE was trained on"
        )
    out = Path(out)
    _check_new_run_dir(out)
    data = None if data is None else str(Path(data).resolve())
    train_cfg = replace(TrainConfig(), model=model.config, data=data, out=str(out))
    torch_rng = encode_bytes(torch.Generator().manual_seed(seed).get_state())
    data_rng = encode_bytes(torch.Generator().manual_seed(seed + 1).get_state())
    state = {
        "tokenizer": tokenizer.to_dict(),
        "loop": start_state(0, torch_rng, _job_state(data_rng, model.config)),
        "imported_from": str(Path(path).resolve()),
    }
    return _save_run(out, 0, model, train_cfg, state)


def upcycle_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    num_experts: int,
    top_k: int | None = None,
    *,
    seed: int = 0,
) -> Path:
    """Sparse upcycling of a dense char-LM run: every layer's one expert copied `num_experts`
    times behind a new router (`moekit.upcycle`), written as a run that continues the dense one.

    The new checkpoint keeps the dense step, random streams, tokenizer, loss history and
    training config (its model config records num_experts and top_k); the optimizer state is
    fresh (AdamW's moments start at zero). At its step the model's loss equals the dense one's.

    Args:
        checkpoint: A dense run directory (its newest checkpoint) or checkpoint (num_experts=1).
        out: A new run directory; continue with `moekit train --resume --out OUT` and the
            dense run's training flags (the model's come from the checkpoint).
        num_experts: Experts E per layer.
        top_k: Experts per token k (default min(2, E), makeMoE's 2).
        seed: Seed of the new routers' weights.

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: The checkpoint is not dense, `out` holds checkpoints, or E, k out of range.
    """
    ckpt = resolve_checkpoint(checkpoint)
    dense = LMConfig.from_dict(ckpt.state["model_config"])
    if dense.num_experts != 1:
        raise ValueError(
            f"--checkpoint {ckpt.path}: num_experts={dense.num_experts}; upcycle takes a dense "
            "run (moekit train --num-experts 1)"
        )
    top_k = min(2, num_experts) if top_k is None and isinstance(num_experts, int) else top_k
    config = replace(dense, num_experts=num_experts, top_k=top_k)  # checks E and k
    out = Path(out)
    _check_new_run_dir(out)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is not consumed
        torch.manual_seed(seed)
        model = SparseMoELanguageModel.from_config(dense)
        model.load_state_dict(ckpt.model)
        upcycle(model, num_experts, top_k)  # every block's MoE: 1 -> E experts
        upcycled = SparseMoELanguageModel.from_config(config)
    upcycled.load_state_dict(model.state_dict())  # strict: the layout the config describes
    saved = ckpt.state["train_config"]
    train_cfg = replace(
        TrainConfig(),
        **{k: v for k, v in saved.items() if k in TRAIN_FIELDS - {"out"}},
        model=config,
        out=str(out),
    )
    loop = ckpt.state.get("loop")
    if not isinstance(loop, dict):
        raise ValueError(
            f"--checkpoint {ckpt.path}: written by an older moekit train (no run state of the "
            "shared training runtime); retrain the dense run with this moekit"
        )
    job = _job_state(loop["job"]["data"], config)  # the dense run's streams go on
    rng = loop["rng"]["torch_ranks"][0]
    state = {
        "tokenizer": ckpt.state["tokenizer"],
        "loop": start_state(ckpt.step, rng, job, loop["evals"], loop["train_losses"]),
        "upcycled_from": {"checkpoint": str(ckpt.path), "step": ckpt.step},
    }
    return _save_run(out, ckpt.step, upcycled, train_cfg, state)
