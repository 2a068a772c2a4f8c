"""Reading weight files that are never unpickled, with one clear error for a file that is not what it claims.

Every checkpoint of the project is either a safetensors file or a ``torch.save`` file read with
``torch.load(weights_only=True)``. Neither executes anything, but a wrong file (a pickle saved as ``ranker.pt`` or
``model.safetensors``, a corrupt header, a truncated copy) used to surface as the library's own exception
(``UnpicklingError`` whose message even suggests ``weights_only=False``, ``SafetensorError``, a miniz
``RuntimeError``). Here each becomes a :class:`WeightsFileError` (a ValueError, so the ``qarm`` dispatcher exits 1
with its JSON line and no traceback) saying "FILE: not a <what> checkpoint (reason)".

Lives in ``feature_store`` because it is the one package both the ranker and the pipelines may import; it imports
torch / safetensors only when called.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

_TORCH_REASON = re.compile(r"(Unsupported global: GLOBAL [^\s]+|unsupported GLOBAL [^\s]+|Unsupported operand \d+"
                           r"|Unsupported class [^\s]+)", re.IGNORECASE)


class WeightsFileError(ValueError):
    """A weights file that is not a checkpoint of the kind its name claims. Names the file and why."""


def _error(path: Path, what: str, reason: str) -> WeightsFileError:
    return WeightsFileError(f"{path}: not a {what} checkpoint ({reason}); it was not loaded (weight files are "
                            "never unpickled)")


def load_torch_weights(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a file that is not a torch weights file raises
    :class:`WeightsFileError` naming it.

    Args:
        path: the file (``ranker.pt``, a ``.pth`` / ``.bin`` state dict, ...).
        what: what it should be, for the message ("ranker", "vision backbone").
    Raises:
        FileNotFoundError: no such file. WeightsFileError: pickled Python objects, truncated, or not a torch file.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} checkpoint file")
    if path.stat().st_size == 0:
        raise _error(path, what, "the file is empty")
    try:
        with warnings.catch_warnings():  # the unpickler's protocol warning says nothing about the file's origin
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _TORCH_REASON.search(str(exc))
        detail = found.group(1) if found else type(exc).__name__
        if "global" in detail.lower() or "class" in detail.lower():
            reason = f"it pickles Python objects that only unpickling could build: {detail}"
        else:
            reason = f"not a torch weights file: {detail}"
        raise _error(path, what, reason) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise _error(path, what, f"truncated or corrupt: {first}") from None


def load_safetensors(path: str | os.PathLike, what: str, framework: str = "pt") -> dict:
    """A safetensors file as ``{name: tensor}`` (torch, or numpy with ``framework="numpy"``); a file that is not
    one raises :class:`WeightsFileError` naming it (a pickle under the name, a bad header, a truncated copy).

    Raises:
        FileNotFoundError: no such file. WeightsFileError: anything safetensors refuses.
    """
    if framework == "numpy":
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} checkpoint file")
    try:
        return load_file(os.fspath(path))
    except Exception as exc:  # safetensors' own SafetensorError (not importable by a stable name), OSError, ...
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise _error(path, what, f"not a safetensors file: {first}") from None


def check_safetensors(path: str | os.PathLike, what: str) -> list[str]:
    """The tensor names of a safetensors file from its header alone (cheap: a driver checks a checkpoint before a
    job ships it to workers); :class:`WeightsFileError` as :func:`load_safetensors` for a file that is not one.
    The header check covers a pickle under the name, a corrupt header and a truncated file (the header's offsets
    must cover the file exactly)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} checkpoint file")
    try:
        with safe_open(os.fspath(path), framework="numpy") as fh:
            return list(fh.keys())
    except Exception as exc:  # SafetensorError and friends, as in load_safetensors
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise _error(path, what, f"not a safetensors file: {first}") from None
