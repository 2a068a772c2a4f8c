"""Versioned, immutable, crash-safe feature store for item embeddings, semantic-ID codes and codebooks.

    from feature_store import FeatureStore, write_embeddings
    store = FeatureStore(root)
    with store.stage() as st:
        write_embeddings(st.path / "item_embeddings.parquet", item_ids, emb)
        version = st.publish(config=cfg, metrics=m, extra={"watermark": ts})
    v = store.read()            # CURRENT, every checksum verified
    item_ids, emb = v.embeddings()

See docs/ARCHITECTURE.md "feature_store" and feature_store/store.py for the on-disk layout. Names are imported
lazily, so ``from feature_store.io import atomic_write_json`` does not pull in pyarrow.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "FeatureStore": "store", "StoreConflictError": "store",
    "Staging": "staging",
    "StoreVersion": "version", "VersionInfo": "version", "CorruptVersionError": "version",
    "VersionNotFoundError": "version",
    "StoreLockedError": "lock",
    "CodeTable": "tables", "TableError": "tables", "read_embeddings": "tables", "read_codes": "tables",
    "read_codebooks": "tables", "write_embeddings": "tables", "write_codes": "tables", "write_codebooks": "tables",
    "RemapConfig": "remap", "remap_code_tables": "remap", "code_churn": "remap",
    "SplitConfig": "split", "time_split": "split", "split_labels": "split",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"feature_store.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'feature_store' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
