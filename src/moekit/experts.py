"""Experts: compute on rows grouped by expert.

rows [M, d] + group_sizes [E] (expert e owns the e-th contiguous segment) -> out [M, d].
Two forms with one interface:
  ExpertBank   stacked weights [E, d_in, d_out]; one grouped GEMM per weight
               (`torch.nn.functional.grouped_mm`) or a loop over the contiguous segments;
  ExpertList   any nn.Modules, one call per segment.
Every expert parameter gets a gradient on every backward (zeros for an expert with no rows),
so DDP needs no `find_unused_parameters`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_positive_int, check_probability
from ._dropout import Dropout, dropout, keep_mask
from .dispatch import DispatchPlan, permute, unpermute
from .ops import (
    fused_moe,
    gathered_grouped_linear,
    grouped_linear,
    grouped_mm_supported,
    row_bias,
    segment_mlp,
    swiglu,
    uses_fused_cpu,
    wants_grouped_mm,
)

ACTIVATIONS = ("relu", "gelu", "swiglu")
INITS = ("default", "kaiming")
BACKENDS = ("auto", "grouped", "loop", "padded")


def _activate(h: Tensor, activation: str) -> Tensor:
    """Hidden activation; SwiGLU splits [.., 2h] into gate | up."""
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    return swiglu(h)


def loop_linear(rows: Tensor, weight: Tensor, sizes: list[int]) -> Tensor:
    """The readable twin of `grouped_linear`: one matmul per contiguous segment.

    `weight.unbind(0)` once, not `weight[e]` per expert: indexing in a loop makes the backward
    build a full-size zero gradient per expert (E^2 work).
    """
    per_expert = weight.unbind(0)  # E x [d_in, d_out]
    segments = rows.split(sizes)
    return torch.cat([seg @ w for seg, w in zip(segments, per_expert, strict=True)])  # [M, d_out]


def _init_weight(weight: Tensor, fan_in: int, init: str) -> None:
    if init == "kaiming":  # makeMoE: kaiming_normal_, fan_in, ReLU gain sqrt(2)
        nn.init.normal_(weight, 0.0, math.sqrt(2.0 / fan_in))
    else:  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(weight, -bound, bound)


class BankWeights(NamedTuple):
    """Stacked expert tensors: w1 [E, d, h or 2h], b1 [E, h or 2h] or None, w2 [E, h, d], b2
    [E, d] or None; an `ExpertBank`'s parameters, or views of another model's (transformers'
    experts, `moekit.hf.experts.bank_weights`)."""

    w1: Tensor
    b1: Tensor | None
    w2: Tensor
    b2: Tensor | None

    def to(self, dtype: torch.dtype) -> BankWeights:
        return BankWeights(*(None if t is None else t.to(dtype) for t in self))


def _segment_layout(backend: str) -> str:
    return {"loop": "segments", "padded": "padded"}.get(backend, "auto")


def _use_grouped(rows: Tensor, weights: BankWeights, backend: str) -> bool:
    """Whether the bank runs as two grouped GEMMs (`F.grouped_mm` wanted and supported)."""
    return (
        wants_grouped_mm(rows.device, backend)
        and grouped_mm_supported(rows, weights.w1)
        and grouped_mm_supported(rows, weights.w2)
    )


def bank_forward(
    weights: BankWeights,
    rows: Tensor,
    group_sizes: Tensor,
    activation: str,
    backend: str = "auto",
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Expert e on its segment of rows [M, d] (grouped by expert, `group_sizes` [E]) -> [M, d]
    in the compute dtype: two grouped GEMMs, or `segment_mlp` (one op that reads the segment
    lengths on the host); `ExpertBank.forward`'s arguments, as plain values (no module is
    built, so torch.compile traces it whole)."""
    dtype = compute_dtype(rows, weights.w1)
    rows, weights = rows.to(dtype), weights.to(dtype)
    if _use_grouped(rows, weights, backend):
        out = _grouped_forward(rows, weights, activation, group_sizes)
    else:
        out = segment_mlp(rows, *weights, group_sizes, activation, _segment_layout(backend))
    return dropout(out, dropout_p, training)


def bank_dispatch(
    weights: BankWeights,
    x: Tensor,
    plan: DispatchPlan,
    activation: str,
    backend: str = "auto",
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Tokens x [N, d] -> [N, d]: `unpermute(bank_forward(permute(x, plan)), plan)` as one op.

    On CPU with any backend but "grouped" the gather, the experts and the weighted combine
    run fused (`ops.fused_cpu`: fewer [M, d] tensors kept for the backward, no weighted
    copy); otherwise the three steps run one after the other. Same result, same dropout
    draws.
    """
    dtype = compute_dtype(x, weights.w1)
    x, weights = x.to(dtype), weights.to(dtype)
    if not uses_fused_cpu(x.device, backend):
        # x has rows (N > 0) iff the plan has (capacities are >= 1): a static test
        if not (x.shape[0] and _use_grouped(x, weights, backend)):
            rows = permute(x, plan)  # [M, d]
            rows = bank_forward(
                weights, rows, plan.group_sizes, activation, backend, dropout_p, training
            )
            return unpermute(rows, plan, x.shape[0])
        rows = _grouped_forward(x, weights, activation, plan.group_sizes, plan)  # [M, d]
        return unpermute(dropout(rows, dropout_p, training), plan, x.shape[0])
    keep, scale = None, 1.0
    if training and dropout_p > 0 and plan.token_index.numel():
        keep, scale = keep_mask((plan.token_index.shape[0], x.shape[1]), dropout_p, x.device)
    w1, b1, w2, b2 = weights
    layout = _segment_layout(backend)
    routed = (plan.token_index, plan.slot_weight, plan.group_sizes)
    return fused_moe(x, *routed, w1, b1, w2, b2, activation, keep, scale, layout=layout)


def _grouped_forward(
    rows: Tensor, weights: BankWeights, activation: str, group_sizes: Tensor, plan=None
) -> Tensor:
    """Two grouped GEMMs; no host sync. With a `plan`, `rows` are the tokens [N, d] and the
    first GEMM gathers them itself (`gathered_grouped_linear`: the gathered [M, d] rows are
    not kept for the backward)."""
    w1, b1, w2, b2 = weights
    offsets = torch.cumsum(group_sizes, 0).to(torch.int32)  # [E] segment ends
    num_rows = rows.shape[0] if plan is None else plan.token_index.shape[0]  # M
    row_expert = None if b1 is None else row_experts(group_sizes, num_rows)  # [M]
    if plan is None:
        hidden = grouped_linear(rows, w1, offsets)  # [M, h]
    else:
        hidden = gathered_grouped_linear(
            rows, w1, offsets, plan.token_index, plan.pair_index, plan.top_k
        )  # [M, h]
    if b1 is not None:
        hidden = hidden + row_bias(b1, row_expert)
    out = grouped_linear(_activate(hidden, activation), w2, offsets)  # [M, d]
    if b2 is not None:
        out = out + row_bias(b2, row_expert)
    return out


def row_experts(group_sizes: Tensor, num_rows: int) -> Tensor:
    """[M] the expert of each row of rows grouped by expert (fixed shapes: no host sync,
    traceable by compile)."""
    ends = torch.cumsum(group_sizes, 0)  # [E]
    return torch.searchsorted(ends, torch.arange(num_rows, device=ends.device), right=True)


class ExpertBank(nn.Module):
    """E feed-forward experts with stacked weights (the fast path).

    expert_e(x) = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e], then dropout; for SwiGLU, w1 holds
    the gate and up projections side by side: [E, d, 2h].

    Args:
        num_experts: E.
        d_model: Input and output width d.
        d_hidden: Hidden width h.
        activation: "relu", "gelu" or "swiglu".
        bias: Whether the experts have biases.
        dropout: Dropout on each expert's output rows in training (makeMoE).
        init: "default" (nn.Linear's uniform) or "kaiming" (normal, std sqrt(2 / fan_in)).
        backend: "grouped" (`F.grouped_mm` where the dtype and alignment allow, else the
            loop), "loop" (`segment_mlp`: one matmul per segment into a shared buffer, with a
            hand-written backward), "padded" (`segment_mlp` on segments padded to the largest:
            one batched matmul per weight), or "auto": grouped on accelerators; on CPU the
            loop, or padded where `padded_capacity` says batched GEMMs measured faster
            (docs/performance.md).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "gelu",
        *,
        bias: bool = False,
        dropout: float = 0.0,
        init: str = "default",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.d_model = check_positive_int("d_model", d_model)
        self.d_hidden = check_positive_int("d_hidden", d_hidden)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.dropout = check_probability("dropout", dropout)
        self.backend = check_choice("backend", backend, BACKENDS)
        check_choice("init", init, INITS)
        width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, width))  # [E, d, h or 2h]
        self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))  # [E, h, d]
        self.b1 = nn.Parameter(torch.empty(num_experts, width)) if bias else None  # [E, h]
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None  # [E, d]
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "default") -> None:
        """Re-initialise every expert ("default" or "kaiming"); biases use nn.Linear's rule."""
        check_choice("init", init, INITS)
        for weight, bias_ in ((self.w1, self.b1), (self.w2, self.b2)):
            fan_in = weight.shape[1]
            _init_weight(weight, fan_in, init)
            if bias_ is not None:
                nn.init.uniform_(bias_, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, index: int) -> BankExpert:
        """Expert `index` as a module over this bank's storage (seed 003 iterates experts)."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"expert index must be an int, got {type(index).__name__}")
        if not -self.num_experts <= index < self.num_experts:
            raise IndexError(f"expert index {index} out of range for {self.num_experts} experts")
        return BankExpert(self, index % self.num_experts)

    def __iter__(self) -> Iterator[BankExpert]:
        return (BankExpert(self, e) for e in range(self.num_experts))

    @property
    def weights(self) -> BankWeights:
        """The bank's tensors, read now (`bank_forward` and `bank_dispatch` take them)."""
        return BankWeights(self.w1, self.b1, self.w2, self.b2)

    def forward(self, rows: Tensor, group_sizes: Tensor) -> Tensor:
        """Apply expert e to its segment of rows (`bank_forward`).

        Args:
            rows: [M, d] grouped by expert.
            group_sizes: [E] int rows per expert, summing to M.

        Returns:
            [M, d] in the compute dtype (the autocast dtype under autocast, else the weights').
        """
        options = (self.activation, self.backend, self.dropout, self.training)
        return bank_forward(self.weights, rows, group_sizes, *options)

    def dispatch(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        """Tokens x [N, d] -> [N, d]: `unpermute(self(permute(x, plan)), plan)` as one op
        (`bank_dispatch`)."""
        options = (self.activation, self.backend, self.dropout, self.training)
        return bank_dispatch(self.weights, x, plan, *options)

    def gathered(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """A few tokens: x [N, d], indices [N, k], weights [N, k] -> [N, d], each (token, slot)
        pair through its expert's weights gathered into a batched matmul: no sort, no host
        sync, fixed shapes. The k outputs are summed with their weights in float32 (or wider).
        No dropout (the caller's inference path); gathering costs N*k experts' weights, so it
        pays while N*k is at most E."""
        dtype = compute_dtype(x, self.w1)
        n, k = indices.shape
        pairs = indices.reshape(-1)  # [N*k]
        rows = x.to(dtype).repeat_interleave(k, dim=0).unsqueeze(1)  # [N*k, 1, d]
        hidden = torch.bmm(rows, self.w1.to(dtype)[pairs])  # [N*k, 1, h or 2h]
        if self.b1 is not None:
            hidden = hidden + self.b1.to(dtype)[pairs].unsqueeze(1)
        out = torch.bmm(_activate(hidden, self.activation), self.w2.to(dtype)[pairs])  # [N*k, 1, d]
        if self.b2 is not None:
            out = out + self.b2.to(dtype)[pairs].unsqueeze(1)
        acc = torch.promote_types(dtype, torch.float32)  # at least float32
        out = out.view(n, k, self.d_model).to(acc) * weights.to(acc).unsqueeze(-1)  # [N, k, d]
        return out.sum(1).to(dtype)  # [N, d]

    def rebuilt(self, fill: Callable[[Tensor], Tensor]) -> ExpertBank:
        """A bank with this one's sizes and options whose parameters are `fill(parameter)`
        (detached; the expert count is what `fill` gives along dim 0), in this bank's mode.
        Built on the meta device: no init work, no RNG draws (sharding, growing)."""
        tensors = {name: fill(p.detach()) for name, p in self.named_parameters(recurse=False)}
        with torch.device("meta"):
            bank = ExpertBank(
                tensors["w1"].shape[0],
                self.d_model,
                self.d_hidden,
                self.activation,
                bias=self.b1 is not None,
                dropout=self.dropout,
                backend=self.backend,
            )
        for name, tensor in tensors.items():
            requires_grad = getattr(self, name).requires_grad
            setattr(bank, name, nn.Parameter(tensor, requires_grad=requires_grad))
        return bank.train(self.training)

    def to_modules(self) -> ExpertList:
        """The same experts as a list of `MLPExpert` modules with copied weights, in this
        bank's train/eval mode."""
        experts = []
        for e in range(self.num_experts):
            expert = MLPExpert(
                self.d_model,
                self.d_hidden,
                self.activation,
                bias=self.b1 is not None,
                dropout=self.dropout,
            ).to(self.w1.device, self.w1.dtype)
            with torch.no_grad():
                expert.fc1.weight.copy_(self.w1[e].t())
                expert.fc2.weight.copy_(self.w2[e].t())
                if self.b1 is not None:
                    expert.fc1.bias.copy_(self.b1[e])
                    expert.fc2.bias.copy_(self.b2[e])
            experts.append(expert)
        return ExpertList(experts).train(self.training)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation!r}, bias={self.b1 is not None}, "
            f"dropout={self.dropout}, backend={self.backend!r}"
        )


def mode_of(owner: str) -> property:
    """A `training` property for a view module: the mode of the module in attribute `owner`
    (setting it, as `nn.Module.__init__` and `.train()` do, changes nothing)."""
    return property(lambda self: getattr(self, owner).training, lambda self, value: None)


class BankExpert(nn.Module):
    """Expert e of an `ExpertBank` as a module: callable on rows [n, d] -> [n, d] with the
    bank's weights (gradients reach the bank), in the bank's train/eval mode.

    `weight` is the first layer's weight in `nn.Linear` layout [h or 2h, d] (seed 000's checks
    read `expert.weight`): a leaf sharing the bank's storage, whose `.grad` is expert e's slice
    of the bank's gradient when the bank has one. The bank is not a submodule: the expert owns
    no parameters of its own.
    """

    def __init__(self, bank: ExpertBank, index: int) -> None:
        super().__init__()
        self.__dict__["bank"] = bank
        self.index = index

    training = mode_of("bank")

    @property
    def weight(self) -> nn.Parameter:
        bank, e = self.bank, self.index
        weight = nn.Parameter(bank.w1.detach()[e].t(), requires_grad=bank.w1.requires_grad)
        if bank.w1.grad is not None:
            weight.grad = bank.w1.grad[e].t()
        return weight

    def forward(self, rows: Tensor) -> Tensor:
        bank, e = self.bank, self.index
        dtype = compute_dtype(rows, bank.w1)
        hidden = rows.to(dtype) @ bank.w1[e].to(dtype)  # [n, h or 2h]
        if bank.b1 is not None:
            hidden = hidden + bank.b1[e].to(dtype)
        out = _activate(hidden, bank.activation) @ bank.w2[e].to(dtype)  # [n, d]
        if bank.b2 is not None:
            out = out + bank.b2[e].to(dtype)
        return dropout(out, bank.dropout, bank.training)

    def extra_repr(self) -> str:
        return f"index={self.index}, bank={self.bank.extra_repr()}"


def compute_dtype(rows: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype experts compute in: the autocast dtype under autocast, else the weights'."""
    device = rows.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class MLPExpert(nn.Module):
    """One feed-forward expert as a module: fc2(act(fc1(x))), then dropout.

    `weight` is fc1's weight (seed 000's check reads `expert.weight`).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        activation: str = "gelu",
        *,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_hidden", d_hidden)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.fc1 = nn.Linear(d_model, width, bias=bias)
        self.fc2 = nn.Linear(d_hidden, d_model, bias=bias)
        self.drop = Dropout(check_probability("dropout", dropout))

    @property
    def weight(self) -> nn.Parameter:
        return self.fc1.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(_activate(self.fc1(x), self.activation)))


class SharedExperts(nn.Module):
    """Always-on experts (DeepSeek's shared experts, Qwen2-MoE's gated shared expert): one
    dense MLP every token goes through, optionally scaled by a learned sigmoid gate.

    x [N, d] -> sigmoid(x @ gate) * mlp(x) (gate [d, 1], when `gate`) or mlp(x).

    Args:
        d_model: d.
        d_hidden: The MLP's hidden width (shared experts x their width).
        activation: "relu", "gelu" or "swiglu".
        gate: Whether the output is gated.
        bias, dropout, init: as for `ExpertBank`.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        activation: str = "gelu",
        *,
        gate: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
        init: str = "default",
    ) -> None:
        super().__init__()
        self.mlp = MLPExpert(d_model, d_hidden, activation, bias=bias, dropout=dropout)
        check_choice("init", init, INITS)
        if init == "kaiming":
            for linear in (self.mlp.fc1, self.mlp.fc2):
                _init_weight(linear.weight, linear.in_features, init)
        self.gate = nn.Linear(d_model, 1, bias=False) if gate else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.mlp(x)  # [N, d]
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out


class ExpertList(nn.ModuleList):
    """Experts as arbitrary modules, each mapping rows [n, d] -> [n, d].

    Each expert is called exactly once per forward, on its contiguous segment; an expert with no
    rows is called on an empty [0, d] batch, so its parameters still get (zero) gradients.
    """

    def __init__(self, experts: Iterable[nn.Module]) -> None:
        super().__init__(experts)
        if len(self) == 0:
            raise ValueError("experts must hold at least one module, got an empty list")

    @property
    def num_experts(self) -> int:
        return len(self)

    def forward(self, rows: Tensor, group_sizes: Tensor) -> Tensor:
        """rows [M, d] grouped by expert, group_sizes [E] -> [M, d]."""
        segments = rows.split(group_sizes.tolist())  # host sync, needed to cut the segments
        outputs = [expert(seg) for expert, seg in zip(self, segments, strict=True)]
        return torch.cat(outputs)  # [M, d]
