"""NumPy arrays of a bundle, optionally memory-mapped read-only.

A model service maps its large tables (item embeddings, the towers' per-item rows)
instead of reading them into private memory: pages are read when a request touches them,
shared between replicas on one machine through the page cache, and dropped by the
kernel under pressure. ``.npz`` files written by ``np.savez`` (uncompressed zip) are
mapped member by member at the offset of their data inside the zip.
"""

from __future__ import annotations

import mmap as _mmap
import struct
import zipfile
from pathlib import Path

import numpy as np

_LOCAL_HEADER = b"PK\x03\x04"


def _map_npy(path: Path, offset: int) -> np.ndarray:
    """The ``.npy`` array whose header starts at byte ``offset`` of ``path``, mapped."""
    with open(path, "rb") as f:
        f.seek(offset)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        data = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: object arrays are not loaded")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(
        path, dtype=dtype, mode="r", shape=shape, offset=data, order="F" if fortran else "C"
    )


def load_npy(path: Path, mmap: bool) -> np.ndarray:
    """An ``.npy`` file, mapped read-only when ``mmap``."""
    if mmap:
        return _map_npy(path, 0)
    return np.load(path, allow_pickle=False)


def load_npz(path: Path, mmap: bool) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file by name; members stored uncompressed are mapped
    read-only when ``mmap`` (compressed ones are read)."""
    if not mmap:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with zf.open(info) as member:
                    out[name] = np.load(member, allow_pickle=False)
                continue
            f.seek(info.header_offset)
            head = f.read(30)
            if head[:4] != _LOCAL_HEADER:
                raise ValueError(f"{path}: {info.filename} has no local file header")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            out[name] = _map_npy(path, info.header_offset + 30 + name_len + extra_len)
    return out


def release(arr: np.ndarray) -> None:
    """Drop a mapped array's pages from this process's resident set (they stay in the
    page cache; a later read maps them again). No-op for arrays in private memory."""
    base: object = arr
    while isinstance(base, np.ndarray):
        mapped = getattr(base, "_mmap", None)  # np.memmap's mapping
        if isinstance(base, np.memmap) and isinstance(mapped, _mmap.mmap):
            mapped.madvise(_mmap.MADV_DONTNEED)
            return
        base = base.base
