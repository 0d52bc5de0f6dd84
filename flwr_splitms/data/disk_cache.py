"""Arrays cached on disk under ``<data root>/.cache/``: written once, atomically; memory-mapped.

A deployed Flower ClientApp starts a fresh process for every message; rebuilding its dataset and
partition each time costs seconds. An entry is a directory holding one ``.npy`` file per array
and ``meta.json`` (the full key, each array's dtype, shape and CRC-32, and small attributes).
It is written into a private temporary directory and renamed into place with ``os.replace``:
readers see a complete entry or none, and when two processes build the same entry at once one
rename wins and the other process keeps its own (identical) arrays. A reader checks the key,
shapes, dtypes and checksums; a damaged entry (a truncated or altered file) is logged, removed
and rebuilt by the caller.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("flwr")

CACHE_DIRNAME = ".cache"
FORMAT_VERSION = 1

Key = Mapping[str, Any]
Arrays = dict[str, np.ndarray]


class CacheCorruptError(ValueError):
    """An entry on disk does not match its own record (a truncated or altered file)."""


def entry_path(root: Path, kind: str, key: Key) -> Path:
    """The directory of the entry for ``key``: ``<root>/.cache/<kind>-<hash of key>``."""
    digest = hashlib.sha256(_key_json(key).encode("utf-8")).hexdigest()[:24]
    return root / CACHE_DIRNAME / f"{kind}-{digest}"


def _key_json(key: Key) -> str:
    return json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True)


def _checksum(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)


def read_entry(path: Path, key: Key) -> tuple[Arrays, dict[str, Any]] | None:
    """Memory-mapped arrays and attributes of a complete entry; None when there is none.

    A damaged entry is removed (so the caller rebuilds it) and None is returned. Arrays are
    mapped copy-on-write: writable in memory, the file never changes.
    """
    if not path.is_dir():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if json.dumps(meta.get("key"), sort_keys=True) != _key_json(key):
            raise CacheCorruptError("its recorded key differs from its name's key")
        arrays: Arrays = {}
        for name, info in meta["arrays"].items():
            array = np.load(path / f"{name}.npy", mmap_mode="c", allow_pickle=False)
            if array.dtype.str != info["dtype"] or list(array.shape) != info["shape"]:
                raise CacheCorruptError(f"{name}.npy has {array.dtype} {array.shape}")
            if _checksum(array) != info["crc32"]:
                raise CacheCorruptError(f"{name}.npy fails its checksum")
            arrays[name] = array
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        logger.warning("data cache entry %s is damaged (%s); rebuilding it", path, why)
        discard(path)
        return None
    return arrays, dict(meta.get("attrs", {}))


def write_entry(path: Path, key: Key, arrays: Mapping[str, np.ndarray], attrs: Key) -> bool:
    """Write an entry atomically; False (and a warning) when the cache folder is not writable.

    Losing a race to another process that wrote the same entry first is not an error.
    """
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
        record: dict[str, Any] = {}
        for name, array in arrays.items():
            data = np.ascontiguousarray(array)
            np.save(tmp / f"{name}.npy", data, allow_pickle=False)
            record[name] = {
                "dtype": data.dtype.str,
                "shape": list(data.shape),
                "crc32": _checksum(data),
            }
        meta = {"key": json.loads(_key_json(key)), "arrays": record, "attrs": dict(attrs)}
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
        try:
            os.replace(tmp, path)  # atomic; refused when ``path`` already holds files
        except OSError:
            if not path.is_dir():
                raise
            logger.debug("data cache entry %s was written by another process", path)
        return True
    except OSError as exc:
        logger.warning(
            "could not write the data cache under %s (%s); continuing without it",
            path.parent,
            " ".join(str(exc).split()),
        )
        return False
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def discard(path: Path) -> None:
    """Remove an entry: renamed aside first (atomic), so no reader sees a half-deleted one."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except OSError:
        return  # already gone (another process discarded it)
    shutil.rmtree(trash, ignore_errors=True)
