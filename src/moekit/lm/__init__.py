"""The makeMoE language model: model, data, training, checkpoints, tracking."""

from .model import KVCache, LMConfig, SparseMoELanguageModel

__all__ = ["KVCache", "LMConfig", "SparseMoELanguageModel"]
