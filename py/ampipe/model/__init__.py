"""The Megatron-style GPT-MoE model: config, modules, per-step block functions, the GPT."""

from .config import ConfigError, ModelConfig
from .layers import TransformerLayer

__all__ = ["ConfigError", "ModelConfig", "TransformerLayer"]
