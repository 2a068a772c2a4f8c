"""The config a cascade version stores in its manifest; its hash is the job's identity."""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

from pipelines.beam.plan import JobPlan


def job_config(plan: JobPlan, spec, data_sha: str) -> dict:
    """The config stored in the manifest; its hash is the job's identity (no paths of this run in it)."""
    align = asdict(plan.align)
    align.pop("threads")
    align.pop("cache_dir")  # a path of this run: the cache is identified by its content fingerprint
    for key in ("checkpoint", "init_encoder"):  # a reused checkpoint is identified by its content, not its path
        if align[key]:
            align[key] = dir_sha(Path(align[key]))
    spec_dict = spec.to_dict()
    spec_dict.pop("data", None) if spec.dataset == "synthetic" else None  # synthetic: image cache path only
    config = {"job": "qarm.cascade/2", "data": spec_dict, "data_sha256": data_sha, "split": asdict(plan.split),
              "pairs": plan.pairs.to_dict(),
              "encoder": plan.align.encoder, "align": align, "quantizer": plan.quant.to_dict(),
              "init_quantizer": dir_sha(Path(plan.init_quantizer)) if plan.init_quantizer else None,
              "unaligned": plan.unaligned}
    if plan.user_prompts is not None:  # only when on: a run without the stage keeps its config hash
        from pipelines.beam.user_prompt_stage import user_encoder_config

        user_encoder = user_encoder_config(plan).to_dict()
        user_encoder.pop("num_threads")
        config["user_prompts"] = {"user_encoder": user_encoder}
    return config


def dir_sha(path: Path) -> str:
    """sha256 over a folder's relative file names and contents (a reused checkpoint's identity)."""
    from feature_store.io import sha256_file

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
