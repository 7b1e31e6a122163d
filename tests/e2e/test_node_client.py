"""A Node.js shop backend calls the gateway: tests/node/gateway.test.mjs (grpc-js and
proto-loader pinned in package.json, Node's built-in test runner) against the real four
services serving the tiny shop (conftest.py). Also keeps the Node example of docs/api.md
identical to the file the test runs."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.e2e.conftest import ApiStack
from tests.procs import REPO

NODE_DIR = REPO / "tests" / "node"


def test_docs_show_the_tested_node_client() -> None:
    """docs/api.md carries tests/node/mercato.mjs verbatim: the example is the tested one."""
    docs = (REPO / "docs" / "api.md").read_text()
    assert (NODE_DIR / "mercato.mjs").read_text().strip() in docs


@pytest.mark.slow
def test_node_client_against_the_real_gateway(api_stack: ApiStack) -> None:
    node = shutil.which("node")
    assert node, "node is required (.ci/run installs nodejs)"
    assert (REPO / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make setup`"
    proc = subprocess.run(
        [node, "--test", str(NODE_DIR / "gateway.test.mjs")],
        cwd=REPO,
        env={
            **os.environ,
            "MERCATO_GATEWAY_TARGET": api_stack.gateway,
            "MERCATO_API_KEY": api_stack.api_key,
            "MERCATO_PROTO_ROOT": str(REPO / "protos"),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "# fail 0" in out, out[-8000:]
    # Node's runner reports "# pass N": every test of the file ran.
    passed = int(out.split("# pass ", 1)[1].split()[0])
    assert passed >= 12, out[-4000:]
