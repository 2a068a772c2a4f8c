"""Any decoder LM as the MLLM's language model: tiny random Llama / GPT-2 configs saved to a local folder (no hub),
with a vision tower whose width (32) differs from the LM's (24); every mode runs, last-token pooling included."""
import numpy as np
import pytest
import torch

from pipelines.encoder import EncoderConfig, load_encoder
from pipelines.encoder.alignment import AlignConfig, train_alignment
from pipelines.encoder.embed_catalog import embed_catalog
from pipelines.encoder.model_io import build_for_mode
from pipelines.encoder.onepass import embed_from_cache
from pipelines.encoder.side import SideConfig

LM_WIDTH = 24


def _save_decoder(folder, kind):
    from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(40)]
    (folder / "vocab.txt").write_text("\n".join(words))
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder / "lm")
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(words), hidden_size=LM_WIDTH, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
        LlamaForCausalLM(cfg).save_pretrained(folder / "lm")
    else:
        cfg = GPT2Config(vocab_size=len(words), n_embd=LM_WIDTH, n_layer=3, n_head=2, n_positions=64, bos_token_id=2,
                         eos_token_id=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        GPT2LMHeadModel(cfg).save_pretrained(folder / "lm")
    return folder / "lm"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def decoder_world(request, tmp_path_factory):
    import pandas as pd
    from types import SimpleNamespace
    from PIL import Image

    folder = tmp_path_factory.mktemp(f"decoder_{request.param}")
    lm = _save_decoder(folder, request.param)
    cfg = EncoderConfig.named("tiny", text=f"hf:{lm}", tiny_width=32, embed_dim=8)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        group = i % 3
        uri = None
        if i % 4:  # a quarter of the items have no image
            Image.fromarray(np.full((16, 16, 3), 80 * group, np.uint8)).save(folder / f"{i}.png")
            uri = f"{i}.png"
        rows.append({"item_id": i, "title": " ".join(f"w{w}" for w in rng.integers(0, 40, 3)) + f" w{group}",
                     "text": None, "image_uri": uri})
    ds = SimpleNamespace(items=pd.DataFrame(rows), interactions=None, image_root=folder)
    pairs = pd.DataFrame([(a, b) for a in range(24) for b in range(a + 1, 24) if a % 3 == b % 3],
                         columns=["left", "right"])
    pairs["source"], pairs["ts"], pairs["weight"] = "swing", np.arange(len(pairs)), 1.0
    return request.param, cfg, ds, pairs


def test_decoder_is_pooled_by_its_last_token(decoder_world):
    _, cfg, _, _ = decoder_world
    encoder = build_for_mode("full", cfg)
    assert encoder.text.is_decoder and encoder.text.pooling == "last"
    assert encoder.vision.width == 32 and encoder.text.hidden_size == LM_WIDTH  # widths differ


@pytest.mark.parametrize("mode", ["full", "adapters", "side", "side-towers"])
def test_every_mode_trains_with_a_decoder_lm(decoder_world, tmp_path, mode):
    _, cfg, ds, pairs = decoder_world
    align = AlignConfig(mode=mode, epochs=2, batch_size=16, lr=3e-3, progress=False, seed=0,
                        side=SideConfig(width=16, dropout=0.0))
    result = train_alignment(cfg, ds, pairs, align, out_dir=tmp_path / "run")
    assert np.isfinite(result.losses).all() and result.steps == 2 * int(np.ceil(len(pairs) / 16))
    ids, emb, _ = embed_catalog(load_encoder(tmp_path / "run"), ds, progress=False)
    assert emb.shape == (24, 8) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    if mode == "side":
        out = embed_from_cache(result.encoder, result.cache, progress=False)
        assert np.allclose(out["aligned"][1], emb, atol=1e-5)
        _, unaligned, _ = embed_catalog(build_for_mode("unaligned", cfg), ds, progress=False)
        assert np.allclose(out["unaligned"][1], unaligned, atol=1e-5)
        has_image = ds.items["image_uri"].notna().to_numpy()
        assert np.array_equal(np.linalg.norm(out["image"][1], axis=1) > 0.5, has_image)


def test_decoder_load_report_is_quiet(decoder_world, capfd):
    _, cfg, _, _ = decoder_world
    capfd.readouterr()
    build_for_mode("full", cfg)  # the saved *ForCausalLM has an lm_head the base model does not: a load report
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "Loading weights" not in err, err[:500]
