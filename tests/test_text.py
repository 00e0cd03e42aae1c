import os

import torch

from core.text import ReportTokenizer, create_text_encoder, minilm_path, split_sentences


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


def test_split_sentences_keeps_every_sentence_once():
    report = "Lung nodule is present in the right upper lobe, measuring 5 mm.  No emphysema; no effusion. Normal"
    assert split_sentences(report) == ["Lung nodule is present in the right upper lobe, measuring 5 mm.",
                                       "No emphysema;", "no effusion.", "Normal"]
    assert split_sentences("") == [""]


def test_sentence_unit_embeds_a_report_as_the_mean_of_its_sentences():
    torch.manual_seed(0)
    encoder = create_text_encoder("tiny-random", pool="cls", unit="sentence").eval()
    whole = ReportTokenizer(encoder.tokenizer, 128, "report")
    reports = ["Lung nodule is present. No emphysema is seen. Heart contour and size are normal.",
               "Cardiomegaly is present."]
    tokens = encoder.tokenize(reports)
    assert tokens["input_ids"].shape[:2] == (2, 3)
    assert tokens["attention_mask"][1, 1:].sum() == 0  # the short report's filler sentences
    with torch.no_grad():
        emb = encoder(**tokens)
        sentences = torch.cat([encoder(**whole([s])) for s in split_sentences(reports[0])])
        single = encoder(**whole([reports[1]]))
    torch.testing.assert_close(emb[0], sentences.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb[1], single[0], rtol=1e-5, atol=1e-5)
