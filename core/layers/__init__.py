"""Transformer building blocks, each chosen by name from a registry.

``create_attention``, ``create_norm`` and ``create_mlp`` are the only way the
encoders build these layers, so an ablation axis is one config string.
"""

from core.layers.attention import create_attention
from core.layers.block import TransformerBlock
from core.layers.mlp import create_mlp
from core.layers.norm import create_norm

__all__ = ["TransformerBlock", "create_attention", "create_mlp", "create_norm"]
