"""moekit: Mixture-of-Experts for PyTorch.

Shape legend (used in every comment and docstring of the package):
    B batch · T time · N tokens (= B*T) · d model width · h expert hidden width · V vocab ·
    E experts · e local experts (E/R) · k top-k · M routed rows (N*k minus drops) ·
    C capacity per expert · S slots per expert (Soft MoE) · R expert-parallel ranks.

Data flow of a token-choice layer: router -> Routing -> DispatchPlan -> permute -> experts ->
unpermute (weighted combine). The seed documents' names are presets over the same engine.
"""

from .dispatch import DispatchPlan, expert_choice_plan, make_plan, permute, unpermute
from .experts import ExpertBank, ExpertList, MLPExpert, grouped_linear, loop_linear
from .layers import MoE, MoEOutput, total_aux_loss
from .lm.model import LMConfig, SparseMoELanguageModel
from .losses import load_balancing_loss, router_z_loss, squared_deviation_loss
from .presets import MixtralBlock, MixtureOfExperts, SimpleMoELayer, SparseMoE, SwitchTransformer
from .routing import (
    ExpertChoice,
    ExpertChoiceRouter,
    NoisyRouter,
    NoisyTopkRouter,
    Router,
    Routing,
    SigmoidRouter,
    SoftmaxRouter,
    SwitchRouter,
    TopKRouter,
    TopkRouter,
    top_k_gating,
    update_router_biases,
)
from .soft import SoftMoE
from .stats import MoEStats, routing_stats
from .upcycle import UpcycledMoE, upcycle

__version__ = "0.1.0"

__all__ = [
    # routing
    "Routing",
    "ExpertChoice",
    "Router",
    "SoftmaxRouter",
    "NoisyRouter",
    "SwitchRouter",
    "SigmoidRouter",
    "ExpertChoiceRouter",
    "update_router_biases",
    "top_k_gating",
    # dispatch
    "DispatchPlan",
    "make_plan",
    "expert_choice_plan",
    "permute",
    "unpermute",
    # experts
    "ExpertBank",
    "ExpertList",
    "MLPExpert",
    "grouped_linear",
    "loop_linear",
    # losses and stats
    "load_balancing_loss",
    "router_z_loss",
    "squared_deviation_loss",
    "MoEStats",
    "routing_stats",
    # layers
    "MoE",
    "MoEOutput",
    "total_aux_loss",
    "SoftMoE",
    "upcycle",
    "UpcycledMoE",
    # the seeds' names
    "SimpleMoELayer",
    "TopKRouter",
    "MixtureOfExperts",
    "SwitchTransformer",
    "MixtralBlock",
    "TopkRouter",
    "NoisyTopkRouter",
    "SparseMoE",
    "SparseMoELanguageModel",
    "LMConfig",
]
