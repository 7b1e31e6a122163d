"""Bundle arrays memory-mapped read-only (services/models/arrays.py): the same values as
``np.load``, and pages that leave the resident set when released."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from services.models.arrays import load_npy, load_npz, release


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "history.weight": rng.normal(size=(1001, 64)).astype(np.float32),
        "item_category": rng.integers(0, 9, size=1001),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "fortran": np.asfortranarray(rng.normal(size=(5, 3))),
        "scalar": np.array(2.5, dtype=np.float32),
    }


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_members_map_to_the_values_np_load_reads(tmp_path: Path, compressed: bool) -> None:
    want = _arrays()
    path = tmp_path / "towers.npz"
    (np.savez_compressed if compressed else np.savez)(path, **want)  # type: ignore[operator]
    for mmap in (False, True):
        got = load_npz(path, mmap)
        assert set(got) == set(want)
        for name, arr in want.items():
            assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
            np.testing.assert_array_equal(got[name], arr)
        big = got["history.weight"]
        # Stored members are mapped (read-only); compressed ones are read.
        assert isinstance(big, np.memmap) == (mmap and not compressed)
        if isinstance(big, np.memmap):
            with pytest.raises(ValueError):
                big[0, 0] = 1.0


def test_npy_maps_and_refuses_objects(tmp_path: Path) -> None:
    arr = _arrays()["history.weight"]
    np.save(tmp_path / "e.npy", arr)
    got = load_npy(tmp_path / "e.npy", mmap=True)
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, arr)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object"):
        load_npy(tmp_path / "o.npy", mmap=True)


def _rss_kb() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]


def test_released_pages_leave_the_resident_set(tmp_path: Path) -> None:
    """64 MB read through the mapping are resident; after ``release`` they are not, and
    the values read again are unchanged."""
    arr = np.arange(16 * 2**20, dtype=np.float32).reshape(-1, 64)
    np.savez(tmp_path / "big.npz", w=arr)
    mapped = np.ascontiguousarray(load_npz(tmp_path / "big.npz", mmap=True)["w"])
    before = _rss_kb()
    assert float(mapped.sum(dtype=np.float64)) == float(arr.sum(dtype=np.float64))
    touched = _rss_kb()
    assert touched - before > 48 * 1024, (before, touched)
    release(mapped)
    assert touched - _rss_kb() > 48 * 1024
    np.testing.assert_array_equal(mapped[-3:], arr[-3:])
    release(arr)  # private memory: nothing happens
