"""The checksum manifest every serving bundle carries (``manifest.json``).

Both bundle kinds (two-tower, ranker) write one on save and check it on load, so a
version with a missing, truncated or edited file is refused before anything is parsed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(d: Path, files: Iterable[str], format_version: int) -> None:
    """Write ``d/manifest.json`` with the size and sha256 of each of ``files``."""
    manifest = {
        "format_version": format_version,
        "files": {
            n: {"sha256": sha256_file(d / n), "bytes": (d / n).stat().st_size} for n in files
        },
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def verify_manifest(
    d: Path,
    required: Iterable[str],
    error: type[Exception],
    verify_checksums: bool = True,
) -> dict[str, Any]:
    """Check ``d`` against its manifest: it lists every ``required`` file, and every
    listed file exists with the recorded size (and sha256 unless ``verify_checksums`` is
    off). Raises ``error`` saying what is wrong; returns the manifest."""
    if not d.is_dir():
        raise error(f"bundle directory {d} does not exist")
    try:
        manifest: dict[str, Any] = json.loads((d / "manifest.json").read_text())
    except FileNotFoundError as e:
        raise error(f"{d}: manifest.json is missing") from e
    except (OSError, ValueError) as e:
        raise error(f"{d}: manifest.json is unreadable: {e}") from e
    listed = manifest.setdefault("files", {})
    for name in required:
        if name not in listed:
            raise error(f"{d}: manifest.json does not list {name}")
    for name, meta in listed.items():
        p = d / name
        if not p.is_file():
            raise error(f"{d}: {name} is missing")
        size = p.stat().st_size
        if size != meta.get("bytes"):
            raise error(
                f"{d}: {name} does not match manifest.json "
                f"({size} bytes, manifest says {meta.get('bytes')})"
            )
        if verify_checksums and sha256_file(p) != meta.get("sha256"):
            raise error(f"{d}: {name} does not match its sha256 in manifest.json")
    return manifest
