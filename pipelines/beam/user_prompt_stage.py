"""The cascade's user-prompt stage (issue 22), behind ``--user-prompts`` (off by default).

After the aligned item embeddings exist, one worker (like the align stage) builds VIP5-style personalized prompts
from the protocol's train portion, trains the MLLM user encoder behind its never-worse gate (step 0: history
pooling of the aligned item embeddings; judged on the validation window's next items) and writes
``user_embeddings.parquet`` (user_id int64, embedding list<float32>, one row per user with a train-portion
positive, the item embeddings' width) into the version being staged, so a downstream system reads user vectors
like item vectors (same version, same protocol; listed in the manifest with sha256 and rows like every table),
and next to it ``user_embeddings_asof.parquet`` (user_id int64, cut_ts int64, embedding): the same encoder's
point-in-time vectors (prompts cut before each user's last --user-prompt-asof-cuts train positives, and at its
train end), which the ranker's "prompt" feature reads so a training example sees no event at or after its time.
The gate and its figures go to ``manifest.metrics.user_prompts`` (the driver reads them from the work dir).

The training itself is the library's (`pipelines.encoder.user_encoder.fit_user_vectors`), the same path as
`qarm align --target user-prompts`; this module is its Beam wrapper. Its knobs are the config tree's
`user_prompts` section (`pipelines.config.cascade.UserPromptsSection`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import apache_beam as beam

from pipelines.beam.common import counter, stage_timer

log = logging.getLogger("pipelines.jobs.cascade")
RECORD_FILE = "user_prompts.json"  # <work_dir>/user_prompts.json: the stage's gate record, for the manifest
STAGE = "user_prompts"


def user_encoder_config(plan):
    """The UserEncoderConfig the stage of ``plan`` (a JobPlan with the stage on) trains with: its knobs, the cascade
    seed, the align worker's torch threads."""
    return plan.user_prompts.encoder_config(seed=plan.align.seed, num_threads=plan.align.threads)


def _slim_train(r: dict, order: tuple) -> Optional[dict]:
    from pipelines.encoder.user_encoder import POSITIVE_LABEL

    if float(r["label"]) <= POSITIVE_LABEL:
        return None
    return {"user_id": int(r["user_id"]), "item_id": int(r["item_id"]), "ts": int(r["ts"]),
            "order": tuple(int(r.get(k) or 0) for k in order)}


def _slim_valid(r: dict) -> Optional[dict]:
    from pipelines.encoder.user_encoder import POSITIVE_LABEL

    if int(r["part"]) != 1 or float(r["label"]) <= POSITIVE_LABEL:
        return None
    return {"user_id": int(r["user_id"]), "item_id": int(r["item_id"]), "ts": int(r["ts"]),
            "order": (int(r["o_file"]), int(r["o_row"]))}


def _events_frame(rows: list):
    """Positive events in the loader's log order (ts, user, then the source's tie-break: the order
    pipelines.data.validate sorts the loader's table in), the order the prompts are built in, as in the job."""
    import pandas as pd

    rows = sorted(rows, key=lambda r: (r["ts"], r["user_id"], r["order"]))
    return pd.DataFrame({k: [r[k] for r in rows] for k in ("user_id", "item_id", "ts")},
                        columns=["user_id", "item_id", "ts"]).astype("int64")


class _TrainUserPrompts(beam.DoFn):
    """The one element: train the user encoder, write the user table into the staged version and the gate record
    into the work dir. The frozen MLLM (the version's encoder config) is built once per worker in setup()."""

    def __init__(self, cfg, encoder: dict, image_root: Optional[str], folder: str, record_path: str):
        self.cfg, self.encoder, self.image_root = cfg, encoder, image_root
        self.folder, self.record_path = folder, record_path
        self.mllm = None

    def setup(self):
        import torch

        from pipelines.encoder.config import EncoderConfig
        from pipelines.encoder.encoder import build_encoder

        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        self.mllm = build_encoder(EncoderConfig.from_dict(self.encoder))

    def process(self, _, items, embeddings, train_rows, valid_rows):
        import copy

        import numpy as np

        from feature_store.io import atomic_write_json
        from pipelines.beam.align_stage import _dataset_view
        from pipelines.encoder.config import EncoderConfig
        from pipelines.encoder.items import ItemCatalog
        from pipelines.encoder.user_encoder import fit_user_vectors, write_user_tables

        with stage_timer(STAGE):
            counter(STAGE, "in").inc(len(train_rows))
            pairs = sorted((int(k), v) for k, v in embeddings)
            item_ids = np.array([k for k, _ in pairs], dtype=np.int64)
            item_vectors = np.stack([np.asarray(v, np.float32) for _, v in pairs]) if pairs else \
                np.zeros((0, 0), np.float32)
            enc_cfg = EncoderConfig.from_dict(self.encoder)
            catalog = ItemCatalog.from_dataset(_dataset_view(items, self.image_root), enc_cfg, cache_images=False)
            # the adapters wrap the LM in place: a retried bundle starts from the frozen MLLM again
            fit = fit_user_vectors(copy.deepcopy(self.mllm), catalog, item_ids, item_vectors,
                                   _events_frame(train_rows), _events_frame(valid_rows), self.cfg)
            paths = write_user_tables(self.folder, fit)
            atomic_write_json(self.record_path, {**fit.record(), "dim": int(item_vectors.shape[1])})
            log.info("user prompts: %d users, %s shipped (%s)", len(fit.user_ids), fit.shipped,
                     fit.result.alignment.get("vs_step0"))
            counter(STAGE, "out").inc(len(fit.user_ids))
        yield str(paths[0])


class UserPromptStage(beam.PTransform):
    """pipeline begin -> the path of the user table written into the staged version (one element, one worker).

    Bound: that worker holds every item row, aligned vector and train / validation positive as side inputs
    (docs/RUNNERS.md, "the user-prompt stage"); the stage is off by default.

    Args:
        cfg: the UserEncoderConfig to train with (UserPromptsSection.encoder_config: cascade seed, threads).
        encoder: the version's EncoderConfig as a dict (the frozen MLLM's vision tower, projector and LM).
        items: validated item dicts (titles, image URIs).
        embeddings: the aligned (item_id, vector) pairs (the stage waits for them: they are its side input).
        train: validated interactions of the protocol's train portion (TrainPortion); positives are read.
        windows: WindowEvents rows; the validation window's positives (part 1) judge the gate.
        image_root, staging, work_dir: the dataset's image root, the staged version, the job's scratch folder.
        order: the tie-break fields inside one (user, ts) of the train records (the loader's log order).
        hints: (name, value) Beam resource hints (the align step's: the same kind of worker).
    """

    def __init__(self, cfg, encoder: dict, items, embeddings, train, windows, image_root: Optional[str],
                 staging: str, work_dir: str, order: tuple = ("_row",), hints: tuple = ()):
        super().__init__()
        self.cfg, self.encoder, self.items, self.embeddings = cfg, encoder, items, embeddings
        self.train, self.windows, self.image_root = train, windows, image_root
        self.staging, self.work_dir, self.order, self.hints = staging, work_dir, order, hints

    def expand(self, pbegin):
        order = self.order
        train = self.train | "TrainPositives" >> beam.FlatMap(lambda r: [x for x in [_slim_train(r, order)] if x])
        valid = self.windows | "ValidPositives" >> beam.FlatMap(lambda r: [x for x in [_slim_valid(r)] if x])
        fn = _TrainUserPrompts(self.cfg, self.encoder, self.image_root, str(Path(self.staging)),
                               str(Path(self.work_dir) / RECORD_FILE))
        return (pbegin | "Trigger" >> beam.Create([None])
                | "Train" >> beam.ParDo(fn, beam.pvalue.AsList(self.items), beam.pvalue.AsList(self.embeddings),
                                        beam.pvalue.AsList(train), beam.pvalue.AsList(valid))
                .with_resource_hints(**dict(self.hints)))


def user_prompts_record(work_dir) -> dict:
    """``manifest.metrics.user_prompts``: the stage's record (which of step 0 / trained shipped, the gate, the
    validation figures, prompt statistics, users written)."""
    import json

    path = Path(work_dir) / RECORD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the user-prompt stage left no record")
    return json.loads(path.read_text())
