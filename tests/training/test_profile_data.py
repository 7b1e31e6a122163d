"""The synthetic set through the profile service (`mercato load --data synthetic`) and
back (`mercato export-events` -> `mercato train retrieval --data events`)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mercato.cli import app
from services.profile.datasets import DatasetUnavailable, open_dataset
from services.profile.logic import ProfileConfig
from services.profile.store.sqlite import SqliteStore
from training.loaders import load_events_export
from training.pipeline import TrainConfig, train_and_register
from training.synthetic import SyntheticConfig, load_synthetic, write_synthetic
from training.two_tower import TwoTowerConfig

pytestmark = pytest.mark.slow  # profile service as a process, trains a model

SMALL = SyntheticConfig(n_users=80, n_items=40, n_categories=8, days=20, seed=11)


def run(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


async def _log_ids(db: Path) -> list[str]:
    store = SqliteStore(db, ProfileConfig())
    await store.open()
    try:
        return [e.event_id async for e in store.iter_log()]
    finally:
        await store.close()


def test_synthetic_set_loads_into_the_profile_service_and_trains_back(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="mercato train generate"):
        open_dataset("synthetic", str(tmp_path / "empty"))
    folder = tmp_path / "syn"
    write_synthetic(SMALL, folder)
    data = load_synthetic(folder)
    ds = open_dataset("synthetic", str(folder))
    items = {i.item_id: i for i in ds.items()}
    assert set(items) == set(data.items["item_id"])
    cat = data.items.set_index("item_id")
    for iid, it in list(items.items())[:10]:
        assert it.category == cat.loc[iid, "category"]
        assert it.price == pytest.approx(cat.loc[iid, "price"])
        assert it.stock >= 0 and it.title and it.attributes["brand"] == cat.loc[iid, "attr_brand"]
    assert {c.customer_id for c in ds.customers()} == set(data.users["user_id"])
    events = list(ds.events())
    assert len(events) == ds.event_count() == len(data.events)
    assert [e.timestamp.seconds for e in events] == sorted(e.timestamp.seconds for e in events)
    assert len({e.event_id for e in events}) == len(events)

    db = tmp_path / "profile.db"
    run("load", "--data", "synthetic", "--path", str(folder), "--sqlite-path", str(db))
    ids = asyncio.run(_log_ids(db))
    assert sorted(ids) == sorted(e.event_id for e in events)

    export = tmp_path / "events.parquet"
    run("export-events", "--out", str(export), "--sqlite-path", str(db))
    back = load_events_export(export)
    key = ["user_id", "item_id", "event", "ts"]
    a = data.events[key].sort_values(key).reset_index(drop=True)
    b = back.events[key].sort_values(key).reset_index(drop=True)
    assert a.equals(b)
    n_sessions = data.events.groupby(["user_id", "session_id"]).ngroups
    assert back.events.groupby(["user_id", "session_id"]).ngroups == n_sessions
    # Surfaces the API has no value for (the generator's "search") come back as "".
    assert set(back.events["surface"]) - {""} <= set(data.events["surface"])

    cfg = TrainConfig(
        data="events",
        path=str(export),
        model=replace(TwoTowerConfig(), dim=8, epochs=1, progress=False),
        baselines=replace(TrainConfig().baselines, models=()),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    res = train_and_register(cfg)
    assert res.version == "1" and res.metrics["valid"]["two_tower"]["users"] > 0
