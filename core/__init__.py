"""CT-CLIP Ablation Lab: the model library and everything a run needs."""

__version__ = "0.1.0"
