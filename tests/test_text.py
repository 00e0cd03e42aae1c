import os

import torch

from core.text import create_text_encoder, minilm_path


def test_default_text_encoder_loads_offline_and_embeds():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    encoder = create_text_encoder("minilm", pool="mean")
    assert (minilm_path() / "model.safetensors").is_file()
    tokens = encoder.tokenize(["Bilateral pleural effusion is present.", "No pleural effusion."])
    with torch.no_grad():
        emb = encoder(**tokens)
    assert emb.shape == (2, 384)
    assert torch.isfinite(emb).all()
    cos = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0)
    assert 0.0 < cos < 0.999  # related but different sentences


def test_tiny_random_text_encoder_uses_the_shipped_tokenizer():
    encoder = create_text_encoder("tiny-random")
    tokens = encoder.tokenize(["Cardiomegaly is present."])
    assert tokens["input_ids"][0, 0].item() == encoder.tokenizer.cls_token_id
    assert encoder(**tokens).shape == (1, 64)
