"""File reading and writing shared by every format: atomic writes, data-only pickles, state files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` then rename tmp over `path`, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Tensors to a .safetensors file, atomically; views of one storage (q/k/v split off one projection, a live
    and an EMA copy) are cloned apart, as safetensors refuses shared storage."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return atomic_write(path, lambda tmp: save_file(out, str(tmp), metadata=metadata))


def write_json(obj: dict[str, Any], path: Path) -> Path:
    """A JSON file, atomically, indented as the tools that read it write theirs."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


# Globals our own Lightning checkpoints need beyond what torch's weights-only unpickler already allows
# (tensors and their storages, OrderedDict, dict/list/tuple/set, numbers, strings, torch.Size, dtypes, devices).
# A stage=vae or stage=ldm checkpoint holds only those: the module's hparams are plain containers (configs are
# instantiated with _convert_="all"), optimizer and scheduler states are dicts of tensors and numbers, and every
# callback and datamodule state is a dict of ints, floats and strings. So the list is empty, on purpose: a
# type added here is code a shared file may run, and needs its reason written beside it.
CHECKPOINT_SAFE_GLOBALS: tuple[Any, ...] = ()


class RefusedFileError(ValueError):
    """A pickle that is not plain data (it would run code when loaded), or a file that is no torch pickle."""


def load_torch_file(path: str | os.PathLike, mmap: bool = True) -> Any:
    """A torch pickle (.ckpt/.pt/.bin) read as data only: anything that would run code is refused, never run.

    Memory-mapped where the file allows it (zip format), so reading the metadata of a multi-GB checkpoint
    does not read its tensors.
    """
    import pickle

    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_SAFE_GLOBALS)):
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as err:
                if not mmap or "mmap" not in str(err):
                    raise
                return torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        blocked = next((line for line in lines if "GLOBAL" in line), None)
        if blocked is None:
            raise RefusedFileError(f"{path}: not a torch checkpoint ({lines[0] if lines else 'unpickling failed'})"
                                   ) from None
        raise RefusedFileError(f"{path}: refused to unpickle: it holds pickled objects other than tensors and plain "
                               f"containers, which could run code ({blocked}); nothing in it was run") from None
    except (OSError, EOFError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RefusedFileError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {first})") from None


def read_state_file(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors from a .safetensors file, or a pickled checkpoint read with weights_only=True (never arbitrary code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return load_torch_file(path, mmap=False)
    except RefusedFileError as err:
        raise ValueError(f"{err} (convert it to .safetensors)") from None
