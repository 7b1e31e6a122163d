"""API keys as docs/operations.md writes them, and re-read on change by a running gateway."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mercato.client import MercatoClient
from services.gateway.auth import ApiKey, ApiKeyAuthenticator, parse_keys
from tests.procs import ServiceProc, free_port, start_service

DOC_LINE = "printf 'shop-web sha256:%s\\n' \"$(printf %s \"$KEY\" | sha256sum | cut -d' ' -f1)\""


def doc_keys_file(path: Path, key: str) -> None:
    """The keys file made by the shell line of docs/operations.md, run as written."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    assert DOC_LINE in doc, "docs/operations.md no longer writes keys this way"
    out = subprocess.run(
        ["bash", "-c", DOC_LINE], env={**os.environ, "KEY": key}, check=True, capture_output=True
    )
    path.write_bytes(out.stdout)


def test_both_formats_parse_to_the_same_keys() -> None:
    digest = hashlib.sha256(b"k1").hexdigest()
    lines = parse_keys(
        f"# comment\nweb sha256:{digest} rate=5 burst=10\nold sha256:{'0' * 64} revoked\n"
    )
    yaml_keys = parse_keys(
        f"keys:\n  - {{name: web, sha256: {digest}, rate_per_second: 5, burst: 10}}\n"
        f"  - {{name: old, sha256: '{'0' * 64}', revoked: true}}\n"
    )

    def fields(keys: list[ApiKey]) -> list[tuple[str, str, float, float, bool]]:
        return [(k.name, k.sha256, k.rate_per_second, k.burst, k.revoked) for k in keys]

    as_tuple = fields(lines)
    assert as_tuple == fields(yaml_keys)
    assert as_tuple[0] == ("web", digest, 5.0, 10.0, False)
    with pytest.raises(ValueError, match="line 1"):
        parse_keys("web md5:abc\n")
    with pytest.raises(ValueError):
        parse_keys("web sha256:zz\n")


def test_authenticator_rereads_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "api-keys"
    doc_keys_file(path, "first")
    auth = ApiKeyAuthenticator.from_file(path, reload_interval=0.0)
    assert auth("m", [("x-api-key", "first")]) == "shop-web"
    path.write_text(f"other sha256:{hashlib.sha256(b'second').hexdigest()}\n")
    os.utime(path, (time.time() + 5, time.time() + 5))  # mtime resolution on some filesystems
    assert auth("m", [("x-api-key", "second")]) == "other"
    assert auth.reloads == 1


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[ServiceProc, Path]]:
    keys = tmp_path / "api-keys"
    doc_keys_file(keys, "key-one")
    dead = f"127.0.0.1:{free_port()}"
    gw = start_service(
        "gateway",
        tmp_path,
        {
            "MERCATO_GATEWAY_PROFILE_TARGET": dead,
            "MERCATO_GATEWAY_RETRIEVAL_TARGET": dead,
            "MERCATO_GATEWAY_RANKING_TARGET": dead,
            "MERCATO_GATEWAY_API_KEYS_FILE": str(keys),
        },
    )
    try:
        yield gw, keys
    finally:
        gw.kill()


def code_for(gw: ServiceProc, key: str) -> str:
    with MercatoClient(gw.target, api_key=key, timeout=5, retries=0) as c:
        try:
            c.recommend("alice", k=2)
            return "OK"
        except grpc.RpcError as exc:
            return str(exc.code().name)


def wait_code(gw: ServiceProc, key: str, want: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    got = ""
    while time.monotonic() < deadline:
        got = code_for(gw, key)
        if got == want:
            return
        time.sleep(0.3)
    raise AssertionError(f"key {key!r}: {got}, want {want}")


@pytest.mark.slow
def test_running_gateway_takes_doc_format_and_new_keys(
    gateway: tuple[ServiceProc, Path],
) -> None:
    gw, keys = gateway
    assert code_for(gw, "key-one") == "OK"
    assert code_for(gw, "key-two") == "UNAUTHENTICATED"
    # Rotate: a new key in, the old one revoked (what updating the Secret does).
    keys.write_text(
        f"shop-web sha256:{hashlib.sha256(b'key-one').hexdigest()} revoked\n"
        f"shop-app sha256:{hashlib.sha256(b'key-two').hexdigest()}\n"
    )
    wait_code(gw, "key-two", "OK")
    assert code_for(gw, "key-one") == "UNAUTHENTICATED"
    # A broken edit is refused; the keys in force stay and the gateway keeps serving.
    keys.write_text("this is not a keys file\n")
    time.sleep(3.0)
    assert code_for(gw, "key-two") == "OK"
    assert gw.process.poll() is None
    assert "not reloaded" in gw.log()
