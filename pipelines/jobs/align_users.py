"""`qarm align --target user-prompts`: the MLLM as a user encoder over VIP5-style personalized prompts (issue 22).

    qarm align --target user-prompts --store STORE --dataset movielens --data ../shared/data/movielens \
        --require-image --split user_last_frac --out runs/up --torch-threads 1 --json

Reads a published version (its encoder config: the same vision tower + projector + LM build the prompts' image
and text tokens; its aligned item embeddings: the space user vectors live in; its protocol: checked against this
run's split, the prompts read only that protocol's train portion), trains the user encoder (never worse than its
step 0, the history-pooled aligned embedding, on the validation window's next items), then:
- writes --out/user_embeddings.parquet (user_id, embedding: the serving vector over the whole train portion),
  --out/user_embeddings_asof.parquet (user_id, cut_ts, embedding: the same encoder's vectors of prompts cut before
  each user's last --user-prompt-asof-cuts train positives and at its train end; what the ranker's "prompt"
  feature reads point-in-time) and --out/user_prompts.json (figures, configs);
- publishes a child version = the parent's files + both user tables (same protocol), unless --no-publish;
- reports retrieval on the test window (Recall@20 / NDCG@20, full ranking, training positives excluded, the
  retrieval stage's own evaluation) of prompt-user vectors, their step 0 (history pooling), and with
  --compare-retrieval the id student, the current multimodal teacher and the id student distilled (list-wise KD)
  from the prompt-user teacher, with paired bootstrap intervals over test users; and the cost to encode 1,000
  users.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def user_encoder_config(args):
    """The UserEncoderConfig of --target user-prompts: the --user-prompt-* knobs, align's --seed and threads."""
    from feature_store.config_tree import section_from_values
    from pipelines.config.cascade import UserPromptsSection

    section = section_from_values(UserPromptsSection, vars(args), strict=False)
    return section.encoder_config(seed=args.seed, num_threads=args.torch_threads)


def run(args: argparse.Namespace) -> dict:
    import torch

    from feature_store import FeatureStore
    from feature_store.io import atomic_write_json
    from feature_store.split import check_protocol, split_from_args
    from pipelines.beam.data_flags import data_spec_from_args
    from pipelines.data import load_dataset
    from pipelines.encoder.config import EncoderConfig
    from pipelines.encoder.encoder import build_encoder
    from pipelines.encoder.items import ItemCatalog
    from pipelines.encoder.user_encoder import fit_user_vectors, positive_windows, write_user_tables

    if not args.store:
        raise ValueError("--target user-prompts needs --store (the version whose item space the users join)")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    t_start = time.perf_counter()
    store = FeatureStore(args.store)
    started_from = store.current_id()
    version = store.read(args.version)
    dataset = load_dataset(data_spec_from_args(args))
    split = split_from_args(args)
    check_protocol(version.manifest.get("protocol"), dataset.interactions, split, version.id)
    enc_cfg = EncoderConfig.from_dict(version.config["encoder"])
    item_ids, item_vectors = version.embeddings()
    cfg = user_encoder_config(args)
    train_pos, valid_pos = positive_windows(dataset.interactions, split)
    mllm = build_encoder(enc_cfg)
    catalog = ItemCatalog.from_dataset(dataset, enc_cfg, cache_images=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fit = fit_user_vectors(mllm, catalog, item_ids, item_vectors, train_pos, valid_pos, cfg,
                           out_dir=None if args.no_resume else out / "user_encoder")
    task, user_ids, vectors = fit.task, fit.user_ids, fit.vectors
    tables = write_user_tables(out, fit)
    retrieval = _retrieval_rows(dataset.interactions, split, version, user_ids, vectors, fit.step0, item_ids,
                                item_vectors, cfg, args)
    report = {
        "target": "user-prompts", "dataset": args.dataset, "parent_version": version.id,
        **fit.record(), "retrieval": retrieval,
        "example_prompt": task.serve[0].render(dict(zip(catalog.items["item_id"], catalog.items["title"])))
        if task.serve else None,
        "config": {"user_encoder": cfg.to_dict(), "encoder": enc_cfg.to_dict(), "split": dataclasses.asdict(split)},
    }
    if not args.no_publish:
        report["version"] = _publish(store, started_from, version, tables, report)
    report["total_seconds"] = time.perf_counter() - t_start
    atomic_write_json(out / "user_prompts.json", report)
    return report


def _publish(store, started_from, parent, user_tables: list, report: dict) -> str:
    """A child version: the parent's files + the user tables (user_embeddings.parquet and its as-of table), same
    protocol; CURRENT moves only if it is still the version this job started from (compare-and-swap at publish).
    A parent's own user tables are replaced, never carried over next to this run's."""
    from pipelines.encoder.user_encoder import ASOF_TABLE, USER_TABLE
    metrics = {**parent.metrics, "user_prompts": {k: report[k] for k in ("alignment", "retrieval", "stats",
                                                                         "encode_seconds_per_1k_users")}}
    config = {**parent.config, "user_encoder": report["config"]["user_encoder"]}
    extra = {**parent.extra, "protocol": parent.manifest.get("protocol"), "user_prompts_parent": parent.id}
    with store.stage(parent=started_from, require_parent_current=True) as st:
        for name in parent.files():
            if name in ("manifest.json", USER_TABLE, ASOF_TABLE):
                continue
            dest = Path(st.path) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(parent.file(name), dest)
        for table in user_tables:
            shutil.copyfile(table, Path(st.path) / Path(table).name)
        return st.publish(config=config, metrics=metrics, extra=extra).id


def _user_matrix(data, user_ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(U, D) rows of the retrieval data's users; zeros for users without a vector."""
    out = np.zeros((data.n_users, vectors.shape[1]), np.float32)
    rows = np.searchsorted(data.user_ids, user_ids)
    ok = (rows < data.n_users) & (data.user_ids[np.minimum(rows, data.n_users - 1)] == user_ids)
    out[rows[ok]] = vectors[ok]
    return out


def _paired(a: dict, b: dict) -> dict:
    """Paired difference a - b over the same test users (Recall@20, NDCG@20), bootstrap 95% interval."""
    from ranker.retrieval.metrics import paired_bootstrap_ci
    if not len(a["per_user_recall"]):
        return {"recall@20_diff": None, "ndcg@20_diff": None, "reason": "no test users"}
    if all(np.array_equal(a[k], b[k]) for k in ("per_user_recall", "per_user_ndcg")):
        return {"recall@20_diff": None, "ndcg@20_diff": None,
                "reason": "identical rankings for every test user (e.g. the gate shipped step 0, so prompt-user is "
                          "history pooling): no interval to estimate"}
    out = {}
    for key, metric in (("per_user_recall", "recall@20"), ("per_user_ndcg", "ndcg@20")):
        diff = np.asarray(a[key]) - np.asarray(b[key])
        out[f"{metric}_diff"] = float(diff.mean())
        out[f"{metric}_diff_ci95"] = paired_bootstrap_ci(diff)
    return out


def _retrieval_rows(interactions, split, version, user_ids, vectors, step0, item_ids, item_vectors, cfg, args):
    """Test-window Recall@20 / NDCG@20 (the retrieval stage's evaluation) of each row, and paired intervals of
    every row against prompt-user. Rows: prompt-user, history-pool (its step 0); with --compare-retrieval:
    student (ids), teacher (ids + multimodal towers), student+prompt-user-kd (list-wise KD from prompt-user)."""
    from ranker.retrieval.config import DistillConfig, RetrievalConfig
    from ranker.retrieval.data import load_item_features, prepare_retrieval_data
    from ranker.retrieval.fit import evaluate, fit_student, fit_teacher
    from ranker.retrieval.models import FixedVectorTeacher

    data = prepare_retrieval_data(interactions, item_ids, split)
    models = {"prompt-user": FixedVectorTeacher(_user_matrix(data, user_ids, vectors), item_vectors),
              "history-pool": FixedVectorTeacher(_user_matrix(data, user_ids, step0), item_vectors)}
    params = {}
    if args.compare_retrieval:
        rcfg = RetrievalConfig(seed=args.seed)
        feats = load_item_features(version, data.item_ids)
        teacher = fit_teacher(data, feats, rcfg)
        student = fit_student(data, rcfg)
        kd_teacher = FixedVectorTeacher(_user_matrix(data, user_ids, vectors), item_vectors,
                                        scale=1.0 / cfg.temperature)
        kd = fit_student(data, rcfg, DistillConfig(listwise=True), teacher=kd_teacher)
        models.update({"student": student.model, "teacher": teacher.model, "student+prompt-user-kd": kd.model})
        params = {"student": student.params, "teacher": teacher.params, "student+prompt-user-kd": kd.params}
    rows, evals = {}, {}
    for name, model in models.items():
        evals[name] = evaluate(model, data, "test", k=20)
        valid = evaluate(model, data, "valid", k=20)
        rows[name] = {"recall@20": evals[name]["recall@20"], "ndcg@20": evals[name]["ndcg@20"],
                      "valid_recall@20": valid["recall@20"], "n_users": evals[name]["n_users"],
                      "params": params.get(name)}
    for name in rows:
        if name != "prompt-user":
            rows[name]["vs_prompt_user"] = _paired(evals[name], evals["prompt-user"])
    if "student" in rows:  # PromptMM's question: does distilling the prompt-user teacher help the id student?
        rows["student+prompt-user-kd"]["vs_student"] = _paired(evals["student+prompt-user-kd"], evals["student"])
    return rows
