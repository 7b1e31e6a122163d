"""The tiny demo shop, trained once per test session and shared.

``tiny_shop`` runs the demo's own steps (data, profile store, two-tower, ranker; see
:mod:`mercato.demo`) into a session directory. ``test_demo`` then runs the whole demo on
it (its training steps find their results there and are skipped), and ``api_stack``
serves it with the four services on free ports for the API contract tests (Python and
Node.js): one training for all of them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from services.common.supervisor import SERVICES, Supervisor
from tests.procs import free_port

API_KEY = "contract-test-key"


@dataclass(frozen=True)
class TinyShop:
    """A trained tiny shop: its MERCATO_HOME and the demo options that made it."""

    home: Path
    users: int = 600
    items: int = 300
    epochs: int = 2
    k: int = 4

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.home / 'mlflow.db'}"


@pytest.fixture(scope="session")
def tiny_shop(tmp_path_factory: pytest.TempPathFactory) -> TinyShop:
    import mercato.cli  # noqa: F401  (registers the "synthetic" dataset, as `mercato` does)
    from mercato.demo import (
        DemoOptions,
        ensure_data,
        load_profiles,
        train_ranker,
        train_retrieval,
    )

    shop = TinyShop(tmp_path_factory.mktemp("tiny-shop") / "home")
    opts = DemoOptions(
        home=shop.home, users=shop.users, items=shop.items, epochs=shop.epochs, progress=False
    )
    console = Console(file=open(shop.home.parent / "train.txt", "w"), width=200)  # noqa: SIM115
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MERCATO_HOME", str(shop.home))
        mp.delenv("MERCATO_MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        path = ensure_data(opts, console)
        load_profiles(path, opts, console)
        train_retrieval(path, opts, console, shop.tracking_uri)
        train_ranker(path, opts, console, shop.tracking_uri)
    console.file.close()
    return shop


@dataclass(frozen=True)
class ApiStack:
    """The four services serving the tiny shop; the gateway requires ``API_KEY``."""

    shop: TinyShop
    gateway: str
    profile: str
    log_dir: Path
    api_key: str = API_KEY
    pids: tuple[tuple[str, int], ...] = ()  # (service, process id)
    retrieval_port: int = 0


@pytest.fixture(scope="module")
def api_stack(tiny_shop: TinyShop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    from mercato.client import MercatoClient
    from services.common.supervisor import health_status

    tmp = tmp_path_factory.mktemp("api")
    keys = tmp / "keys.yaml"
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    keys.write_text(f"keys:\n  - {{name: contract, sha256: {digest}}}\n")
    ports = {name: (free_port(), free_port()) for name in SERVICES}
    sup = Supervisor(
        ports=ports,
        env={
            "MERCATO_HOME": str(tiny_shop.home),
            "MERCATO_MLFLOW_TRACKING_URI": tiny_shop.tracking_uri,
            "MERCATO_GATEWAY_API_KEYS_FILE": str(keys),
            # Offer state of its own: decisions made here never reach the demo's.
            "MERCATO_RANKING_OFFERS_STATE_PATH": str(tmp / "offers.db"),
        },
        log_dir=tmp / "logs",
    )
    sup.start()
    try:
        assert sup.wait_healthy(120), [(p.name, p.status) for p in sup.processes]
        gateway = f"127.0.0.1:{ports['gateway'][0]}"
        retrieval = f"127.0.0.1:{ports['retrieval'][0]}"
        deadline = time.monotonic() + 120
        while health_status(retrieval) != "SERVING":
            assert time.monotonic() < deadline, "retrieval did not load its model"
            time.sleep(0.2)
        with MercatoClient(gateway, api_key=API_KEY, timeout=5.0) as client:
            while not any(m.name == "mercato-ranker" for m in client.recommend("", k=1).models):
                assert time.monotonic() < deadline, "ranking did not load the ranker"
                time.sleep(0.2)
        yield ApiStack(
            tiny_shop,
            gateway,
            f"127.0.0.1:{ports['profile'][0]}",
            tmp / "logs",
            pids=tuple((p.name, p.process.pid) for p in sup.processes),
            retrieval_port=ports["retrieval"][0],
        )
    finally:
        sup.stop()
