"""`mercato up --detach` starts the four services healthy; `mercato down` stops them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.procs import REPO, free_port


def test_up_and_down(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MERCATO_HOME": str(tmp_path / "home")}
    for name in ("profile", "retrieval", "ranking", "gateway"):
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
        assert up.stdout.count("SERVING") == 4
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
        assert status.stdout.count("SERVING") == 4, status.stdout
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
