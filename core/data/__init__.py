"""CT-RATE data: the reader, preprocessing and cache, the training Dataset, and a synthetic CT-RATE."""

from core.data.pathologies import PATHOLOGIES

__all__ = ["PATHOLOGIES"]
