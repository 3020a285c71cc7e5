"""The makeMoE language model: a decoder-only transformer whose feed-forwards are MoE layers.

idx [B, T] -> token + position embeddings [B, T, d] -> n_layer x (x + attn(ln1 x); x + moe(ln2 x))
-> ln_f -> lm_head -> logits [B, T, V]. Causal attention runs through
`F.scaled_dot_product_attention`; `generate` decodes with a KV cache and, like makeMoE, conditions
on the last `block_size` tokens once the context grows past it.
Defaults are makeMoE's (https://github.com/AviSoori1x/makeMoE): 8,996,545 parameters at V=65.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .._checks import (
    check_capacity_factor,
    check_choice,
    check_non_negative,
    check_positive_int,
    check_probability,
    check_top_k,
)
from .._dropout import Dropout, dropout
from ..experts import ACTIVATIONS, INITS
from ..layers import ROUTERS, MoE, total_aux_loss
from ..routing import NoisyTopkRouter
from .decode import decoder_for


@dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Architecture of `SparseMoELanguageModel`; saved with every checkpoint."""

    vocab_size: int = field(
        default=65, metadata={"help": "tokens in the vocabulary (from the tokenizer)"}
    )
    block_size: int = field(default=32, metadata={"help": "context length in tokens"})
    n_embed: int = field(default=128, metadata={"help": "model width d"})
    n_head: int = field(default=8, metadata={"help": "attention heads"})
    n_layer: int = field(default=8, metadata={"help": "transformer blocks"})
    num_experts: int = field(default=8, metadata={"help": "experts per MoE layer"})
    top_k: int = field(default=2, metadata={"help": "experts per token"})
    dropout: float = field(default=0.1, metadata={"help": "dropout probability"})
    router: str = field(default="noisy", metadata={"help": f"router: one of {', '.join(ROUTERS)}"})
    capacity_factor: float | None = field(
        default=None, metadata={"help": "expert capacity factor (default: dropless)"}
    )
    activation: str = field(
        default="relu", metadata={"help": "expert activation: relu, gelu, swiglu"}
    )
    init: str = field(
        default="kaiming", metadata={"help": "weight init: kaiming (makeMoE) or default"}
    )
    load_balance_coef: float = field(
        default=0.01, metadata={"help": "coefficient of the Switch load-balancing loss"}
    )
    z_loss_coef: float = field(default=0.0, metadata={"help": "coefficient of the router z-loss"})
    num_shared_experts: int = field(
        default=0, metadata={"help": "always-on experts per layer (DeepSeek's shared experts)"}
    )
    shared_gate: bool = field(
        default=False, metadata={"help": "scale the shared experts by a sigmoid gate (Qwen2-MoE)"}
    )
    num_groups: int = field(
        default=1, metadata={"help": "expert groups for group-limited routing (router sigmoid)"}
    )
    top_k_groups: int | None = field(
        default=None, metadata={"help": "groups a token picks its experts from (default: all)"}
    )
    scaling_factor: float = field(
        default=1.0, metadata={"help": "multiplier on the routed weights (routed_scaling_factor)"}
    )

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_embed", "n_head", "n_layer", "num_experts"):
            check_positive_int(name, getattr(self, name))
        check_top_k(self.top_k, self.num_experts)
        if self.n_embed % self.n_head:
            raise ValueError(f"n_embed={self.n_embed} must be divisible by n_head={self.n_head}")
        check_probability("dropout", self.dropout)
        check_choice("router", self.router, ROUTERS)
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"top_k={self.top_k} must be 1 for router='switch'")
        check_capacity_factor(self.capacity_factor)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("init", self.init, INITS)
        check_non_negative("load_balance_coef", self.load_balance_coef)
        check_non_negative("z_loss_coef", self.z_loss_coef)
        if isinstance(self.num_shared_experts, bool) or not isinstance(
            self.num_shared_experts, int
        ):
            raise TypeError(f"num_shared_experts must be an int, got {self.num_shared_experts!r}")
        if self.num_shared_experts < 0 or (self.shared_gate and not self.num_shared_experts):
            raise ValueError(
                f"num_shared_experts={self.num_shared_experts} must be >= 0, and >= 1 with "
                "shared_gate"
            )
        if self.router != "sigmoid" and (self.num_groups != 1 or self.top_k_groups is not None):
            raise ValueError(
                f"num_groups and top_k_groups need router='sigmoid', got {self.router!r}"
            )
        check_non_negative("scaling_factor", self.scaling_factor)
        if self.router in ("switch", "expert_choice") and self.scaling_factor != 1.0:
            raise ValueError(
                f"scaling_factor needs router softmax, noisy or sigmoid, got {self.router!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown LMConfig fields {sorted(unknown)}")
        return cls(**values)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, in buffers allocated once.

    Each layer's keys and values live in [B, H, max_length, hd] buffers made at the first
    `extend` (its batch, heads, dtype and device); a step writes its positions in place and
    attends to a view of the filled part, so decoding allocates nothing per token.
    """

    def __init__(self, n_layer: int, max_length: int) -> None:
        self.max_length = check_positive_int("max_length", max_length)
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer
        self.lengths = [0] * n_layer

    @property
    def length(self) -> int:
        """Tokens cached (as seen by the last layer, i.e. after a whole forward)."""
        return self.lengths[-1]

    def past(self, layer: int) -> int:
        """Tokens already cached for `layer`."""
        return self.lengths[layer]

    def reset(self) -> None:
        """Forget every token; the buffers stay for the next sequence of the same shape."""
        self.lengths = [0] * len(self.lengths)

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's k, v [B, H, T, hd]; return views of all keys and values so far."""
        past, t = self.lengths[layer], k.shape[2]
        if past + t > self.max_length:
            raise ValueError(
                f"KVCache holds max_length={self.max_length} tokens; {past} cached + {t} new"
            )
        self._allocate(layer, k)
        self.keys[layer][:, :, past : past + t] = k
        self.values[layer][:, :, past : past + t] = v
        self.lengths[layer] = past + t
        return self.keys[layer][:, :, : past + t], self.values[layer][:, :, : past + t]

    def write(self, layer: int, position: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Fixed shapes (a step replayable as a CUDA graph): write one token's k, v [B, H, 1, hd]
        at `position` ([1] int64, on the device) and return the whole buffers [B, H, max_length,
        hd]; the caller masks the positions after `position`. `lengths` is not advanced."""
        self._allocate(layer, k)
        self.keys[layer].index_copy_(2, position, k)
        self.values[layer].index_copy_(2, position, v)
        return self.keys[layer], self.values[layer]

    def _allocate(self, layer: int, k: Tensor) -> None:
        buffer = self.keys[layer]
        if buffer is None or buffer.shape[:2] != k.shape[:2] or buffer.dtype != k.dtype:
            shape = (*k.shape[:2], self.max_length, k.shape[3])
            # zeros, not empty: the fixed-shape step multiplies the masked positions' values by
            # a zero weight, and 0 * (NaN left in fresh memory) is NaN
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = k.new_zeros(shape)


def _attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, p: float) -> Tensor:
    """Causal attention with dropout on the weights, written out: the computation of
    `scaled_dot_product_attention(..., dropout_p=p, is_causal=True)`, whose CPU kernel draws one
    Bernoulli sample per weight (an eighth of the makemoe training step); `dropout` draws 16
    bits per weight in one call, and the causal mask rides in the score GEMM as an additive
    bias. q, k, v [B, H, T, hd] -> [B, H, T, hd]."""
    b, h, t, hd = q.shape
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    bias = torch.zeros(t, t, dtype=q.dtype, device=q.device).masked_fill(future, -math.inf)
    scores = torch.baddbmm(
        bias.expand(b * h, t, t),
        q.reshape(b * h, t, hd),
        k.reshape(b * h, t, hd).transpose(1, 2),
        alpha=1.0 / math.sqrt(hd),
    )  # [B*H, T, T]
    weights = dropout(torch.softmax(scores, dim=-1), p, True).view(b, h, t, t)
    return weights @ v


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, one fused qkv projection (makeMoE's heads, batched).

    Scores are scaled by 1/sqrt(head_dim); makeMoE scales by 1/sqrt(n_embed), a slip that
    flattens the attention of its 8 heads.
    """

    def __init__(self, n_embed: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embed, 3 * n_embed, bias=False)  # makeMoE: bias-free q, k, v
        self.proj = nn.Linear(n_embed, n_embed)
        self.dropout = dropout
        self.resid_drop = Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        last_only: bool = False,
        position: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, d] -> [B, T, d], or [B, 1, d] for the last position alone (`last_only`:
        keys and values of every position, one query). `position` ([1] int64 on the device,
        T = 1, with a cache): the fixed-shape decoding step, attending over the whole cache
        buffer with the positions after `position` masked."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x [B, T, d]
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        if position is not None:
            k, v = cache.write(layer, position, k, v)  # [B, H, L, hd]
            seen = torch.arange(cache.max_length, device=x.device) <= position  # [L]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=seen.view(1, 1, 1, -1))
            return self.proj(y.transpose(1, 2).reshape(b, t, d))  # eval: no dropout
        past = 0
        if cache is not None:
            past = cache.past(layer)
            k, v = cache.extend(layer, k, v)  # [B, H, past + T, hd]
        if last_only:  # the last query sees every key: no mask
            q, t = q[:, :, -1:], 1
        if self.training and self.dropout > 0 and x.device.type == "cpu":
            y = _attention_with_dropout(q, k, v, self.dropout)  # [B, H, T, hd]
        else:
            mask = None
            if past and t > 1:  # queries at positions past..past+T-1 see keys 0..their own
                mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=past == 0 and t > 1,
            )  # [B, H, T, hd]
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm transformer block: communication (attention) then computation (MoE)."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embed)
        self.attn = CausalSelfAttention(config.n_embed, config.n_head, config.dropout)
        self.ln2 = nn.LayerNorm(config.n_embed)
        router, options = config.router, {}
        if router == "noisy":  # makeMoE's router: noisy top-k over biased linears
            router = NoisyTopkRouter(config.n_embed, config.num_experts, config.top_k)
            router.scaling_factor = config.scaling_factor
        elif router == "sigmoid":
            options = dict(num_groups=config.num_groups, top_k_groups=config.top_k_groups)
        if router in ("softmax", "sigmoid") and config.scaling_factor != 1.0:
            options["scaling_factor"] = config.scaling_factor
        self.moe = MoE(
            config.n_embed,
            config.num_experts,
            config.top_k,
            4 * config.n_embed,
            config.activation,
            router=router,
            capacity_factor=config.capacity_factor,
            bias=True,
            dropout=config.dropout,
            init=config.init,
            load_balance_coef=config.load_balance_coef,
            z_loss_coef=config.z_loss_coef,
            num_shared_experts=config.num_shared_experts,
            shared_gate=config.shared_gate,
            **options,
        )

    def forward(
        self,
        x: Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        last_only: bool = False,
        aux_losses: bool = True,
        position: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, d] -> [B, T, d]; `last_only`: [B, 1, d], the last position's; `position`:
        the fixed-shape decoding step (see `CausalSelfAttention`)."""
        h = self.attn(self.ln1(x), cache, layer, last_only, position)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.moe(self.ln2(x), aux_losses=aux_losses).output


class SparseMoELanguageModel(nn.Module):
    """makeMoE's sparse-MoE character language model on moekit's engine.

    Args:
        vocab_size, block_size, n_embed, n_head, n_layer, num_experts, top_k, dropout: as makeMoE.
        **options: further `LMConfig` fields (router, capacity_factor, activation, init, ...).

    `forward(idx [B, T], targets [B, T] | None) -> (logits [B, T, V], loss | None)`; the loss is
    the plain cross-entropy (comparable to makeMoE's); `aux_loss()` gives the MoE layers' summed
    auxiliary losses of the last forward, which the trainer adds.
    """

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 32,
        n_embed: int = 128,
        n_head: int = 8,
        n_layer: int = 8,
        num_experts: int = 8,
        top_k: int = 2,
        dropout: float = 0.1,
        **options,
    ) -> None:
        super().__init__()
        self.config = LMConfig(
            vocab_size=vocab_size,
            block_size=block_size,
            n_embed=n_embed,
            n_head=n_head,
            n_layer=n_layer,
            num_experts=num_experts,
            top_k=top_k,
            dropout=dropout,
            **options,
        )
        cfg = self.config
        self.token_embedding_table = nn.Embedding(cfg.vocab_size, cfg.n_embed)
        self.position_embedding_table = nn.Embedding(cfg.block_size, cfg.n_embed)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embed)
        self.lm_head = nn.Linear(cfg.n_embed, cfg.vocab_size)
        # recompute each block's activations in the backward (training forwards only)
        self.activation_checkpointing = False
        if cfg.init == "kaiming":  # makeMoE: kaiming_normal_ on every nn.Linear weight
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.kaiming_normal_(module.weight)

    @classmethod
    def from_config(cls, config: LMConfig) -> SparseMoELanguageModel:
        return cls(**config.to_dict())

    def _check_idx(self, idx: Tensor, name: str, past: int = 0) -> None:
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.long, torch.int32, torch.int16):
            raise TypeError(f"{name} must be an integer tensor of shape [B, T]")
        if idx.dim() != 2:
            raise ValueError(f"{name} must have shape [B, T], got {tuple(idx.shape)}")
        if past + idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"{name} length {past + idx.shape[1]} exceeds block_size={self.config.block_size}"
            )
        if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
            low, high = int(idx.min()), int(idx.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"{name} values must lie in [0, vocab_size={self.config.vocab_size}), "
                    f"got [{low}, {high}]"
                )

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Args: idx: token ids [B, T]; targets: next-token ids [B, T] or None; cache: a KVCache
        to extend (generation). Returns (logits [B, T, V], mean cross-entropy or None)."""
        logits = self.lm_head(self.ln_f(self._hidden(idx, cache)))  # [B, T, V]
        if targets is None:
            return logits, None
        self._check_idx(targets, "targets")
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape")
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return logits, loss

    def _hidden(
        self,
        idx: Tensor,
        cache: KVCache | None,
        last_only: bool = False,
        position: Tensor | None = None,
    ) -> Tensor:
        """idx [B, T] -> the final blocks' output [B, T, d]; `last_only`: [B, 1, d], the last
        position's alone (the last block computes one query and one token's MoE, and the MoE
        layers skip their auxiliary losses: decoding). `position` ([1] int64 on the device):
        one token [B, 1] at that position through `cache` with fixed shapes (no host reads)."""
        if position is None:
            past = 0 if cache is None else cache.length
            self._check_idx(idx, "idx", past)
            positions = torch.arange(past, past + idx.shape[1], device=idx.device)  # [T]
        else:
            positions = position
        x = self.token_embedding_table(idx) + self.position_embedding_table(positions)  # [B, T, d]
        last = len(self.blocks) - 1
        recompute = self.activation_checkpointing and self.training and cache is None
        for layer, block in enumerate(self.blocks):
            last_block = last_only and layer == last
            if recompute:  # the same noise draws in the recomputation (RNG state preserved)
                x = torch.utils.checkpoint.checkpoint(
                    block,
                    x,
                    None,
                    layer,
                    last_block,
                    use_reentrant=False,
                    aux_losses=not last_only,
                    position=position,
                )
            else:
                x = block(x, cache, layer, last_block, aux_losses=not last_only, position=position)
        return x

    def aux_loss(self) -> Tensor:
        """The MoE layers' scaled auxiliary losses from the last forward, summed."""
        return total_aux_loss(self)

    def moe_layers(self) -> list[MoE]:
        return [block.moe for block in self.blocks]

    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        *,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample `max_new_tokens` tokens after the context idx [B, T0] -> [B, T0 + new].

        Each token is conditioned on the last `block_size` tokens, as makeMoE. The KV cache
        serves while the context fits in `block_size`; past it every step re-encodes the last
        `block_size` tokens (positions are absolute within the window, so no key can be kept).
        Runs in eval mode (no dropout, no routing noise) and restores the mode after.

        Args:
            temperature: Logits are divided by it (> 0).
            top_k: Sample only among the k most likely tokens (None: all).
            generator: Random source for sampling (reproducible under a seed).
            use_cache: False re-encodes the whole window at every step (the reference path).
        """
        steps = self.stream(
            idx, max_new_tokens, temperature, top_k, generator=generator, use_cache=use_cache
        )
        return torch.cat([idx, *steps], dim=1)

    def stream(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        *,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[Tensor]:
        """`generate`, one sampled token [B, 1] at a time, as each is drawn (same draws)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        if top_k is not None:
            check_top_k(top_k, self.config.vocab_size)
        self._check_idx(idx[:, -self.config.block_size :], "idx")
        return self._sample(idx, max_new_tokens, temperature, top_k, generator, use_cache)

    def _sample(self, idx, max_new_tokens, temperature, top_k, generator, use_cache):
        """Yields each token [B, 1]. The model is in eval mode until the stream is exhausted or
        closed; only the forwards run without grad (a grad mode held across a yield would leak
        into the caller)."""
        was_training = self.training
        self.eval()
        try:
            yield from self._draw(idx, max_new_tokens, temperature, top_k, generator, use_cache)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def _logits(self, idx: Tensor, cache: KVCache | None, position: Tensor | None = None) -> Tensor:
        """The next token's logits [B, V] after idx [B, T] (and the cached tokens); with
        `position`, the fixed-shape step of one token (`_hidden`)."""
        hidden = self._hidden(idx, cache, last_only=True, position=position)
        return self.lm_head(self.ln_f(hidden[:, -1]))

    def _draw(self, idx, max_new_tokens, temperature, top_k, generator, use_cache, static=None):
        """The sampling loop; `static` (default: on CUDA) runs fixed-shape steps, replayed as
        CUDA graphs (`moekit.lm.decode`)."""
        static = idx.device.type == "cuda" if static is None else static
        decoder = decoder_for(self, idx.shape[0], use_cache, static)
        logits = decoder.start(idx[:, -self.config.block_size :])
        for step in range(max_new_tokens):
            next_logits = logits.float() / temperature  # [B, V]
            if top_k is not None:
                kth = torch.topk(next_logits, top_k, dim=-1).values[:, -1:]
                next_logits = next_logits.masked_fill(next_logits < kth, -math.inf)
            probs = F.softmax(next_logits, dim=-1)
            idx_next = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
            yield idx_next
            idx = torch.cat([idx, idx_next], dim=1)
            if step == max_new_tokens - 1:
                break
            logits = decoder.next(idx)
