"""Encoder checkpoints: safetensors weights + a JSON config, written atomically; resume state; load_encoder.

Layout of a checkpoint root (the ``out_dir`` of training)::

    checkpoints/step-00000120/   config.json, model.safetensors, optimizer.safetensors, trainer_state.json
    checkpoints/LATEST           name of the newest complete step folder

A step folder is filled under a temporary name and renamed into place (a new name, so the rename is atomic);
LATEST is then replaced atomically. A crash leaves either the previous checkpoint or the new one, never a mix.
Frozen-backbone modes (adapters, side) store only their trainable tensors ("delta"): the backbones are rebuilt
from the encoder config's pretrained weights on load.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from feature_store.io import atomic_write_text, fsync_dir
from feature_store.weights import load_safetensors

FORMAT = "qarm-encoder/1"
CKPT_DIR = "checkpoints"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared / non-contiguous storage; clone to be safe about tied weights.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, slots in opt_state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: Path, step: int, meta: dict, model_state: dict[str, torch.Tensor],
                    optimizer_state: Optional[dict] = None, trainer_state: Optional[dict] = None,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root/checkpoints`` and point LATEST at it.

    Args:
        meta: JSON config (format, mode, encoder config, adapter/side config, align config, ...).
        model_state: tensors to restore (full state or the trainable delta).
        optimizer_state: ``optimizer.state_dict()`` for resume, or None.
        trainer_state: JSON resume state (epoch, step, losses, rng seeds).
        keep: how many step folders to retain.
    Returns:
        the step folder.
    """
    base = Path(root) / CKPT_DIR
    base.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = base / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_contiguous(model_state), str(tmp / "model.safetensors"))
        if optimizer_state is not None:
            tensors, opt_meta = _flatten_optimizer(optimizer_state)
            save_file(_contiguous(tensors), str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state or {}, indent=2))
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=2, default=str))
        for f in tmp.iterdir():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fsync_dir(tmp)
        final = base / name
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(base / "LATEST", name + "\n")
    for old in sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith("step-"))[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: Path) -> Path:
    """A step folder from: the folder itself, a root holding ``checkpoints/LATEST``, or ``checkpoints/``."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    for base in (path / CKPT_DIR, path):
        latest = base / "LATEST"
        if latest.is_file():
            step = base / latest.read_text().strip()
            if not (step / "config.json").is_file():
                raise FileNotFoundError(f"{latest} points at {step}, which has no config.json")
            return step
    raise FileNotFoundError(f"no encoder checkpoint at {path} (expected config.json + model.safetensors, or "
                            f"{CKPT_DIR}/LATEST)")


def latest_checkpoint(root: Path) -> Optional[Path]:
    try:
        return resolve_checkpoint(root)
    except FileNotFoundError:
        return None


def read_meta(path: Path) -> dict:
    step = resolve_checkpoint(path)
    meta = json.loads((step / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{step / 'config.json'}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], Optional[dict], dict]:
    """(meta, model_state, optimizer_state or None, trainer_state) of a checkpoint."""
    step = resolve_checkpoint(path)
    meta = read_meta(step)
    state = load_safetensors(step / "model.safetensors", "encoder")  # a wrong file: WeightsFileError naming it
    optimizer = None
    if (step / "optimizer.safetensors").is_file():
        optimizer = _unflatten_optimizer(load_safetensors(step / "optimizer.safetensors", "encoder optimizer"),
                                         json.loads((step / "optimizer.json").read_text()))
    trainer = json.loads((step / "trainer_state.json").read_text()) if (step / "trainer_state.json").is_file() \
        else {}
    return meta, state, optimizer, trainer


def load_encoder(path: Path, device: str = "cpu"):
    """Restore an encoder for inference from a checkpoint folder (or a training out_dir).

    full: the whole MLLM; adapters: pretrained backbones + adapters; side: frozen backbones + side network
    (embeddings match the ones it was trained with on the hidden-state cache). Returned in eval mode.
    """
    from pipelines.encoder.model_io import build_for_meta, load_state

    meta, state, _, _ = read_checkpoint(path)
    encoder = build_for_meta(meta)
    load_state(encoder, state, meta, source=resolve_checkpoint(path))
    return encoder.to(device).eval()
