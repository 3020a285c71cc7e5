"""The makeMoE language model: model, data, training, checkpoints, tracking."""

from .convert import from_makemoe_state_dict, upcycle_checkpoint
from .model import KVCache, LMConfig, SparseMoELanguageModel

__all__ = [
    "KVCache",
    "LMConfig",
    "SparseMoELanguageModel",
    "from_makemoe_state_dict",
    "upcycle_checkpoint",
]
