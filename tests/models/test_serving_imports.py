"""Serving code never imports torch: retrieval and ranking serve their models from
exported arrays (NumPy towers and ranker, FAISS). The processes themselves are checked
with both models loaded in ``tests/e2e/test_api_contract.py``
(``test_model_services_serve_without_torch``); this is the quick check on imports, in a
fresh interpreter so that nothing this test session imported counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.procs import REPO

SERVING_MODULES = (
    "services.retrieval.server",
    "services.retrieval.model",
    "services.ranking.server",
    "services.ranking.ranker",
    "services.models",
    "services.models.watcher",
)


def test_serving_modules_do_not_import_torch() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {SERVING_MODULES!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_training_still_reaches_the_torch_networks_through_the_serving_modules() -> None:
    """``TwoTowerNet`` / ``build_net`` / ``RankerNet`` are imported from the serving
    modules by training: they load torch on first use."""
    from services.models import ranker, two_tower

    assert two_tower.TwoTowerNet.__module__ == "services.models.two_tower_net"
    assert callable(two_tower.build_net)
    assert ranker.RankerNet.__module__ == "services.models.ranker_net"
