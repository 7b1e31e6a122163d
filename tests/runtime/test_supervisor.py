"""`mercato up --detach` starts the four services healthy; `mercato down` stops them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import REPO, free_port

pytestmark = pytest.mark.slow  # starts the four services as processes

SERVICES = ("profile", "retrieval", "ranking", "gateway")
# Without a trained model retrieval is alive but not ready; the other three serve.
WANT = {
    "profile": "SERVING",
    "retrieval": "NOT_SERVING",
    "ranking": "SERVING",
    "gateway": "SERVING",
}


def health_by_service(table: str) -> dict[str, str]:
    """service -> the health word of its row in a rich table (SERVING, NOT_SERVING, ...).
    A word match, so NOT_SERVING never counts as SERVING."""
    out: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if cells and cells[0] in SERVICES:
            words = [w for c in cells[1:] for w in re.findall(r"\b[A-Z_]+\b", c)]
            status = [w for w in words if w in {"SERVING", "NOT_SERVING", "UNREACHABLE"}]
            out[cells[0]] = status[0] if status else " ".join(cells[1:])
    return out


# Logged by retrieval once its first registry look-up found no model: from then on its
# NOT_SERVING is a finding, not just the state before the look-up ran.
NO_MODEL_LOG = "no model loaded yet"


def wait_for_log(path: Path, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{text!r} never logged in {path}"
        time.sleep(0.1)


def test_up_and_down(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MERCATO_HOME": str(tmp_path / "home")}
    for name in SERVICES:
        env[f"MERCATO_{name.upper()}_PORT"] = str(free_port())
        env[f"MERCATO_{name.upper()}_METRICS_PORT"] = str(free_port())
    up = subprocess.run(
        [sys.executable, "-m", "mercato.cli", "up", "--detach", "--timeout", "90"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    pids_file = tmp_path / "home" / "run" / "services.json"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert health_by_service(up.stdout) == WANT, up.stdout
        wait_for_log(tmp_path / "home" / "logs" / "retrieval.log", NO_MODEL_LOG)
        pids = json.loads(pids_file.read_text())
        assert set(pids) == {"profile", "retrieval", "ranking", "gateway"}
        status = subprocess.run(
            [sys.executable, "-m", "mercato.cli", "status"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health_by_service(status.stdout) == WANT, status.stdout
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "mercato.cli", "down"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert down.returncode == 0
    assert "gateway" in down.stdout
    assert not pids_file.exists()
    for entry in pids.values():
        try:
            os.kill(entry["pid"], 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, f"process {entry['pid']} still running"
