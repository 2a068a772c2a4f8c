"""Versioned, immutable, crash-safe feature store for item embeddings, semantic-ID codes and codebooks.

    from feature_store import FeatureStore
    store = FeatureStore(root)
    with store.stage() as st:
        write_embeddings(st.path / "item_embeddings.parquet", item_ids, emb)
        version = st.publish(config=cfg, metrics=m, extra={"watermark": ts})
    v = store.read()            # CURRENT, every checksum verified
    item_ids, emb = v.embeddings()

See docs/ARCHITECTURE.md "feature_store" and feature_store/store.py for the on-disk layout.
"""
from feature_store.lock import StoreLockedError
from feature_store.store import (CorruptVersionError, FeatureStore, Staging, StoreConflictError, StoreVersion,
                                 VersionInfo, VersionNotFoundError)
from feature_store.tables import (CodeTable, TableError, read_codebooks, read_codes, read_embeddings,
                                  write_codebooks, write_codes, write_embeddings)

__all__ = [
    "FeatureStore", "Staging", "StoreVersion", "VersionInfo", "CodeTable",
    "CorruptVersionError", "VersionNotFoundError", "StoreConflictError", "StoreLockedError", "TableError",
    "read_embeddings", "read_codes", "read_codebooks", "write_embeddings", "write_codes", "write_codebooks",
]
