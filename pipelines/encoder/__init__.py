"""MLLM item encoder and behaviour alignment (issue 4).

    from pipelines.encoder import EncoderConfig, ItemEncoder, ItemInput, build_encoder, load_encoder
    enc = build_encoder(EncoderConfig.named("minilm-effnet"))     # or "tiny" for tests
    emb = enc(enc.collate([ItemInput(item_id, title, text, image)]))   # (B, D) L2-normalised

Heavy pieces (training, Beam handler) live in submodules and are imported on use. The side-mode job API (one
backbone pass: cache -> side network -> every embedding) is ``pipelines.encoder.onepass``.
"""
from pipelines.encoder.checkpoint import load_encoder
from pipelines.encoder.config import EncoderConfig, register_config, registered_configs
from pipelines.encoder.encoder import EncoderBase, ItemBatch, ItemEncoder, build_encoder, count_params
from pipelines.encoder.items import ItemCatalog, ItemInput, ModalityStats

__all__ = ["EncoderConfig", "EncoderBase", "ItemBatch", "ItemEncoder", "ItemInput", "ItemCatalog", "ModalityStats",
           "build_encoder", "load_encoder", "count_params", "register_config", "registered_configs"]
