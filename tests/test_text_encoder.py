"""Text encoder: offline loading (built-in MiniLM, a CXR-BERT-type directory, random init), tokenisation."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, BertModel

from fvlm.config import TextConfig
from fvlm.model.text_encoder import build_text_encoder, encode_cls, load_tokenizer, resolve_text_path, tokenize_unique

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer("builtin:minilm")


def test_builtin_minilm_loads_its_weights_without_pooler():
    model, tok = build_text_encoder(TextConfig(pretrained="builtin:minilm", max_length=128))
    assert model.pooler is None and not any("pooler" in n for n, _ in model.named_parameters())
    file = load_file(str(resolve_text_path("builtin:minilm") / "model.safetensors"))
    key = next(k for k in file if k.endswith("encoder.layer.5.output.dense.weight"))
    assert torch.equal(model.encoder.layer[5].output.dense.weight, file[key])
    enc = tok(["the lung is clear.", "cardiomegaly."], padding="longest", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        cls = encode_cls(model, enc["input_ids"], enc["attention_mask"])
        full = model(**enc).last_hidden_state
    assert cls.shape == (2, 384)
    torch.testing.assert_close(cls, full[:, 0])


def test_cxr_bert_type_directory_loads_as_bert(tmp_path, minilm_tokenizer, caplog):
    # a BERT saved with its MLM head (weights under bert.*) whose config says model_type "cxr-bert" and
    # points at custom code, like microsoft/BiomedVLP-CXR-BERT-specialized: loads without trust_remote_code
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(minilm_tokenizer), **TINY_BERT))
    d = tmp_path / "cxr"
    mlm.save_pretrained(d)
    minilm_tokenizer.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="cxr-bert", architectures=["CXRBertModel"],
               auto_map={"AutoModel": "modeling_cxrbert.CXRBertModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    # CXR-BERT ships vocab.txt only (no tokenizer.json): AutoTokenizer cannot resolve "cxr-bert" -> BertTokenizer
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer.json").unlink()
    shutil.copy(resolve_text_path("builtin:minilm") / "vocab.txt", d / "vocab.txt")
    with caplog.at_level(logging.INFO, logger="fvlm.model.text_encoder"):
        model, tok = build_text_encoder(TextConfig(pretrained=str(d), max_length=64))
    assert "using BertTokenizer on its vocab.txt" in caplog.text
    assert isinstance(model, BertModel) and model.pooler is None
    for (name, p), (_, q) in zip(model.named_parameters(), mlm.bert.named_parameters()):
        assert torch.equal(p, q), name
    assert tok("pleural effusion.")["input_ids"] == minilm_tokenizer("pleural effusion.")["input_ids"]


def test_random_init_and_config_errors(tmp_path, minilm_tokenizer):
    model, tok = build_text_encoder(TextConfig(pretrained="builtin:minilm", random_init=TINY_BERT, max_length=64))
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tok) == len(minilm_tokenizer)
    assert model.pooler is None
    with pytest.raises(ValueError, match="unknown BertConfig field"):
        build_text_encoder(TextConfig(random_init={"hidden_sizes": 32}))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build_text_encoder(TextConfig(random_init=TINY_BERT, max_length=128))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_text_encoder(TextConfig(pretrained="microsoft/BiomedVLP-CXR-BERT-specialized"))
    with pytest.raises(ValueError, match="unknown built-in"):
        build_text_encoder(TextConfig(pretrained="builtin:cxrbert"))


def test_missing_encoder_weights_are_an_error(tmp_path, minilm_tokenizer):
    d = tmp_path / "short"
    BertModel(BertConfig(vocab_size=len(minilm_tokenizer), **TINY_BERT), add_pooling_layer=False).save_pretrained(d)
    minilm_tokenizer.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the file holds 2 layers: layer 2 would silently stay random
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing"):
        build_text_encoder(TextConfig(pretrained=str(d), max_length=64))


def test_tokenize_unique(minilm_tokenizer):
    long_text = " ".join(["nodule"] * 50)
    texts = [["lung clear.", "heart normal in size.", "lung clear."],
             ["heart normal in size.", long_text, "no hernia."]]
    out = tokenize_unique(minilm_tokenizer, texts, max_length=16)
    assert out["text_index"].tolist() == [[0, 1, 0], [1, 2, 3]]
    assert out["input_ids"].shape == (4, 16)  # the long text is truncated to max_length
    out = tokenize_unique(minilm_tokenizer, [["lung clear.", "no hernia."]], max_length=16)
    lengths = [len(minilm_tokenizer(t)["input_ids"]) for t in ("lung clear.", "no hernia.")]
    assert out["input_ids"].shape == (2, max(lengths))  # padded to the longest, not to max_length
    assert out["attention_mask"].sum(1).tolist() == lengths


def _texts_batch(tok, texts):
    enc = tok(texts, padding="longest", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


TEXTS = ["Emphysema.", "Not Emphysema.", "Centrilobular emphysema in both upper lobes, with a 6 mm nodule.",
         "Lung shows no significant abnormalities.", "x", "Heart size is normal and there is no effusion."]


def test_bucketed_encoding_equals_one_padded_call():
    model, tok = build_text_encoder(TextConfig(pretrained="builtin:minilm", random_init=TINY_BERT, max_length=64))
    model.eval()
    ids, mask = _texts_batch(tok, TEXTS)
    for pooling in ("cls", "mean"):
        one = encode_cls(model, ids, mask, bucket_size=0, pooling=pooling)
        bucketed = encode_cls(model, ids, mask, bucket_size=2, pooling=pooling)
        torch.testing.assert_close(bucketed, one, rtol=1e-5, atol=1e-5)
    # mean pooling really averages the unpadded tokens (the first text has few tokens, others pad it)
    hidden = model(input_ids=ids[:1, : int(mask[0].sum())]).last_hidden_state
    torch.testing.assert_close(encode_cls(model, ids, mask, pooling="mean")[0], hidden[0].mean(0), rtol=1e-5,
                               atol=1e-5)


def test_layer_truncation_and_freezing():
    model, _ = build_text_encoder(TextConfig(pretrained="builtin:minilm", num_layers=3, freeze_layers=2))
    assert len(model.encoder.layer) == 3 and model.config.num_hidden_layers == 3
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("embeddings.") for n in frozen)
    assert any(n.startswith("encoder.layer.1.") for n in frozen)
    assert not any(n.startswith("encoder.layer.2.") for n in frozen)
    with pytest.raises(ValueError, match="num_layers"):
        build_text_encoder(TextConfig(pretrained="builtin:minilm", num_layers=7))
    with pytest.raises(ValueError, match="freeze_layers"):
        build_text_encoder(TextConfig(pretrained="builtin:minilm", num_layers=2, freeze_layers=3))


def test_frozen_prefix_cache_is_exact_and_trains_the_top():
    from fvlm.model.text_encoder import FrozenPrefixCache

    model, tok = build_text_encoder(TextConfig(pretrained="builtin:minilm", random_init=TINY_BERT, max_length=64,
                                               freeze_layers=1))
    model.eval()
    ids, mask = _texts_batch(tok, TEXTS)
    cache = FrozenPrefixCache(model, freeze_layers=1, capacity=4)
    expected = encode_cls(model, ids, mask, bucket_size=0, pooling="mean")
    got = cache.encode(ids, mask, "mean", bucket_size=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (cache.misses, cache.hits) == (6, 0) and len(cache.store) == 4  # capacity bounds the store
    again = cache.encode(ids[:4], mask[:4], "mean")
    torch.testing.assert_close(again, expected[:4], rtol=1e-5, atol=1e-5)
    assert cache.hits >= 2
    # gradients reach the trainable top layer, not the frozen bottom
    model.zero_grad()
    cache.encode(ids, mask, "cls").sum().backward()
    assert model.encoder.layer[1].attention.self.query.weight.grad is not None
    assert model.encoder.layer[0].attention.self.query.weight.grad is None
