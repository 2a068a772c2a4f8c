"""A text-only catalog never builds the vision tower nor reads its weights: the encoder config drops vision for a
catalog without any image (EncoderConfig.for_catalog), in the cascade's plan and in `qarm align`."""
import numpy as np
import pandas as pd
import pytest

from pipelines.encoder import EncoderConfig
from pipelines.encoder.config import catalog_has_images
from pipelines.encoder.items import ItemCatalog
from pipelines.encoder.onepass import build_mllm_cache
from pipelines.encoder.side import SideConfig

TEXT_ONLY = pd.DataFrame({"item_id": np.arange(12, dtype=np.int64), "title": [f"item {i}" for i in range(12)],
                          "text": ["words"] * 12, "image_uri": [None] * 12})


@pytest.fixture
def vision_forbidden(monkeypatch):
    """Building any vision tower (open_clip's builder) or reading vision weights fails the test."""
    import open_clip.model

    from pipelines.encoder import towers

    def refuse(*args, **kwargs):
        raise AssertionError("the vision tower was built / its weights were read for a text-only catalog")

    monkeypatch.setattr(open_clip.model, "_build_vision_tower", refuse)
    monkeypatch.setattr(towers, "load_trunk_weights", refuse)


def test_for_catalog_drops_vision_only_when_no_item_has_an_image():
    assert not catalog_has_images(TEXT_ONLY) and not catalog_has_images(TEXT_ONLY.drop(columns=["image_uri"]))
    assert catalog_has_images(TEXT_ONLY.assign(image_uri=[None] * 11 + ["a.png"]))
    real = EncoderConfig.named("minilm-effnet")
    text_only = real.for_catalog(False)
    assert text_only.vision == "none" and text_only.vision_weights is None and not text_only.has_vision
    assert text_only.text == real.text and text_only.embed_dim == real.embed_dim
    assert real.for_catalog(True) is real and text_only.for_catalog(False) is text_only


def test_side_cache_of_a_text_only_catalog_builds_no_vision_tower(vision_forbidden):
    cfg = EncoderConfig.named("tiny").for_catalog(catalog_has_images(TEXT_ONLY))
    catalog = ItemCatalog(TEXT_ONLY, None, cfg.image_size, cfg.image_mean, cfg.image_std,
                          load_images=cfg.has_vision, cache_images=False)
    cache = build_mllm_cache(cfg, catalog, SideConfig(width=32, dropout=0.0), progress=False)
    assert len(cache) == 12 and cache.layout["vision_widths"] in ([], ())


def test_the_vision_guard_fires_for_an_encoder_with_vision(vision_forbidden):
    """The guard is real: the same build with the tiny vision tower kept trips it."""
    cfg = EncoderConfig.named("tiny")
    catalog = ItemCatalog(TEXT_ONLY, None, cfg.image_size, cfg.image_mean, cfg.image_std, load_images=False,
                          cache_images=False)
    with pytest.raises(AssertionError, match="vision tower"):
        build_mllm_cache(cfg, catalog, SideConfig(width=32, dropout=0.0), progress=False)
