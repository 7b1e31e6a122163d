"""ModelWatcher against a real MLflow store (sqlite in tmp_path)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest
from prometheus_client import REGISTRY

from services.models.registry import ModelVersionInfo
from services.models.watcher import ModelRejected, ModelWatcher
from training.registry import client_for, ensure_experiment, register_bundle

MODEL = "watcher-test-model"


class Store:
    """A real MLflow store where each version's bundle is one text file."""

    def __init__(self, tmp: Path, name: str = MODEL) -> None:
        self.uri = f"sqlite:///{tmp / 'mlflow.db'}"
        self.tmp = tmp
        self.name = name
        self.client, _ = client_for(self.uri)
        self.exp = ensure_experiment(self.client, "watcher-test", self.uri, None)

    def register(self, content: str | None, alias: str | None = "challenger") -> str:
        run = self.client.create_run(self.exp)
        src = self.tmp / f"src-{run.info.run_id}"
        src.mkdir()
        if content is not None:
            (src / "value.txt").write_text(content)
        else:
            (src / "other.txt").write_text("no value file")
        self.client.log_artifacts(run.info.run_id, str(src), "bundle")
        self.client.set_terminated(run.info.run_id)
        mv = register_bundle(self.client, run.info.run_id, self.name, alias)
        return str(mv.version)

    def alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)


class Loader:
    """load(): reads value.txt; 'bad' fails validation; records calls and threads."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[str] = []
        self.threads: set[int] = set()
        self.delay = delay

    def __call__(self, path: Path, info: ModelVersionInfo) -> str:
        self.calls.append(info.version)
        self.threads.add(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        value = (path / "value.txt").read_text()  # missing file -> FileNotFoundError
        if value == "bad":
            raise ModelRejected("value is 'bad'")
        return value


def metric(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def make_watcher(store: Store, loader: Loader, aliases: list[str], **kw: object) -> ModelWatcher:
    return ModelWatcher(
        model_name=store.name,
        aliases=aliases,
        tracking_uri=store.uri,
        cache_dir=store.tmp / "cache",
        load=loader,
        service="test",
        **kw,  # type: ignore[arg-type]
    )


def test_loads_aliases_shares_versions_and_swaps(tmp_path: Path) -> None:
    store = Store(tmp_path)
    v1 = store.register("one")
    store.alias("champion", v1)
    loader = Loader()
    w = make_watcher(store, loader, ["champion", "challenger"], poll_interval_s=60)
    changes: list[int] = []
    w.add_listener(lambda: changes.append(len(w.loaded())))

    async def run() -> None:
        await w.start()
        try:
            champ, chall = w.get("champion"), w.get("challenger")
            assert champ is not None and chall is not None
            assert (champ.model, champ.info.version, champ.info.alias) == ("one", v1, "champion")
            assert (chall.info.version, chall.info.alias) == (v1, "challenger")
            assert chall.model is champ.model
            assert chall.loaded_at == champ.loaded_at  # shared, not reloaded
            assert loader.calls == [v1]  # one version under two aliases: loaded once
            assert threading.get_ident() not in loader.threads  # loaded in a worker thread
            assert metric("mercato_model_loaded_version", model=MODEL, alias="champion") == float(
                v1
            )
            assert changes == [1, 2]

            v2 = store.register("two")  # challenger -> v2
            await w.poll()
            assert w.get("challenger").model == "two"  # type: ignore[union-attr]
            assert w.get("champion") is champ  # untouched
            store.alias("champion", v2)
            await w.poll()
            new = w.get("champion")
            assert new is not None and (new.model, new.info.version) == ("two", v2)
            assert loader.calls == [v1, v2]
            assert champ.model == "one"  # a reader's snapshot never changes under it
            assert metric("mercato_model_loaded_version", model=MODEL, alias="champion") == float(
                v2
            )
            assert sorted(w.loaded()) == ["challenger", "champion"]
            # The cache keeps only what is served.
            assert sorted(p.name for p in (tmp_path / "cache" / MODEL).iterdir()) == [f"v{v2}"]
        finally:
            await w.stop()

    asyncio.run(run())


def test_broken_versions_are_refused_and_the_old_one_keeps_serving(tmp_path: Path) -> None:
    store = Store(tmp_path)
    good = store.register("good", alias="champion")
    loader = Loader()
    w = make_watcher(store, loader, ["champion"], poll_interval_s=60)

    async def run() -> None:
        await w.start()
        try:
            assert w.get("champion").model == "good"  # type: ignore[union-attr]
            invalid = store.register("bad", alias="champion")
            await w.poll()
            assert w.get("champion").info.version == good  # type: ignore[union-attr]
            assert (
                metric(
                    "mercato_model_refused_total",
                    model=MODEL,
                    alias="champion",
                    version=invalid,
                    reason="invalid",
                )
                == 1.0
            )
            missing = store.register(None, alias="champion")  # no value.txt
            await w.poll()
            await w.poll()  # a refused version is not retried on every poll
            assert w.get("champion").model == "good"  # type: ignore[union-attr]
            assert (
                metric(
                    "mercato_model_refused_total",
                    model=MODEL,
                    alias="champion",
                    version=missing,
                    reason="load",
                )
                == 1.0
            )
            assert loader.calls == [good, invalid, missing]
            assert metric("mercato_model_loaded_version", model=MODEL, alias="champion") == float(
                good
            )
            fixed = store.register("fixed", alias="champion")
            await w.poll()
            assert w.get("champion").info.version == fixed  # type: ignore[union-attr]
        finally:
            await w.stop()

    asyncio.run(run())


def test_missing_model_then_background_poll_and_runtime_alias(tmp_path: Path) -> None:
    store = Store(tmp_path)
    loader = Loader(delay=0.3)
    w = make_watcher(store, loader, ["champion"], poll_interval_s=0.2)
    notified = asyncio.Event()

    async def run() -> None:
        w.add_listener(notified.set)
        await w.start()  # nothing registered: no error, nothing loaded
        try:
            assert w.get("champion") is None and w.loaded() == {}
            v1 = await asyncio.to_thread(store.register, "one", "champion")
            # The background poll picks it up; the loop keeps ticking during the slow load.
            ticks = 0
            deadline = time.monotonic() + 20
            while w.get("champion") is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                ticks += 1
            assert w.get("champion").info.version == v1  # type: ignore[union-attr]
            assert notified.is_set()
            assert ticks >= 20  # 0.3 s load in a thread did not block the event loop
            v2 = await asyncio.to_thread(store.register, "two", "exp-b")
            w.watch("exp-b")  # per-request alias: loaded in the background
            w.watch("exp-b")  # idempotent
            deadline = time.monotonic() + 20
            while w.get("exp-b") is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            got = w.get("exp-b")
            assert got is not None and (got.model, got.info.version) == ("two", v2)
            assert w.aliases == ["champion", "exp-b"]
        finally:
            await w.stop()

    asyncio.run(run())


def test_rejects_bad_interval(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ModelWatcher(
            model_name="m",
            aliases=["champion"],
            tracking_uri="sqlite:///x.db",
            cache_dir=tmp_path,
            load=lambda p, i: None,
            poll_interval_s=0,
        )


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "mercato.models.watcher" and r.levelno == level]


def test_lookup_failures_are_counted_per_alias_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An alias missing from the registry: counted on every poll under its own labels,
    warned about once (not on every poll), warned again once it disappears after having
    been found; the warning carries the alias and the registry's error as fields."""
    caplog.set_level(logging.INFO, logger="mercato.models.watcher")
    name = "watcher-lookup-model"
    store = Store(tmp_path, name=name)
    w = make_watcher(store, Loader(), ["champion"], poll_interval_s=60)

    def errors(alias: str = "champion") -> float | None:
        return metric("mercato_model_poll_errors_total", model=name, alias=alias)

    async def run() -> None:
        await w.start()
        try:
            assert errors() == 1.0
            await w.poll()
            assert errors() == 2.0
            warned = _records(caplog, logging.WARNING)
            assert len(warned) == 1  # once per alias, not once per poll
            rec = warned[0]
            assert (rec.model, rec.alias) == (name, "champion")  # type: ignore[attr-defined]
            assert "champion" in rec.error  # type: ignore[attr-defined]

            v1 = await asyncio.to_thread(store.register, "one", "champion")
            await w.poll()
            assert w.get("champion").info.version == v1  # type: ignore[union-attr]
            assert errors() == 2.0  # a good look-up is not an error
            store.client.delete_registered_model_alias(name, "champion")
            await w.poll()
            await w.poll()
            assert errors() == 4.0
            assert len(_records(caplog, logging.WARNING)) == 2  # found, then lost: warned again
            assert w.get("champion").info.version == v1  # type: ignore[union-attr]
        finally:
            await w.stop()

    asyncio.run(run())


def test_unusable_registry_is_counted_and_logged_with_the_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A registry store that cannot be opened (its path runs through a regular file):
    not an unknown alias but a failed look-up, counted under the model and alias and
    logged on each poll with the error's type."""
    caplog.set_level(logging.INFO, logger="mercato.models.watcher")
    (tmp_path / "afile").write_text("not a directory")
    name = "watcher-unusable-model"
    w = ModelWatcher(
        model_name=name,
        aliases=["champion"],
        tracking_uri=f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}",
        cache_dir=tmp_path / "cache",
        load=Loader(),
        service="test",
        poll_interval_s=60,
    )

    async def run() -> None:
        await w.start()
        try:
            await w.poll()
            assert w.loaded() == {}
            assert metric("mercato_model_poll_errors_total", model=name, alias="champion") == 2.0
            warned = _records(caplog, logging.WARNING)
            assert len(warned) == 2
            for rec in warned:
                assert (rec.model, rec.alias) == (name, "champion")  # type: ignore[attr-defined]
                assert rec.error.startswith("FileExistsError: ")  # type: ignore[attr-defined]
        finally:
            await w.stop()

    asyncio.run(run())


def test_failed_download_is_refused_then_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A download that fails (the cache folder cannot be created) is refused with reason
    'download' under the alias and version, the alias keeps serving, and unlike a broken
    bundle the version is retried on the next poll and loads once the fault is gone."""
    caplog.set_level(logging.INFO, logger="mercato.models.watcher")
    name = "watcher-download-model"
    store = Store(tmp_path, name=name)
    loader = Loader()
    w = make_watcher(store, loader, ["champion"], poll_interval_s=60)
    heard: list[str] = []

    def broken_listener() -> None:
        raise RuntimeError("listener bug")

    w.add_listener(broken_listener)  # a failing listener neither stops the swap nor the others
    w.add_listener(lambda: heard.append(w.get("champion").info.version))  # type: ignore[union-attr]

    async def run() -> None:
        await w.start()
        try:
            assert w.loaded() == {}
            v1 = await asyncio.to_thread(store.register, "one", "champion")
            blocker = tmp_path / "cache" / name
            blocker.parent.mkdir(parents=True, exist_ok=True)
            blocker.write_text("a file where the cache folder goes")
            await w.poll()
            await w.poll()
            assert w.get("champion") is None and loader.calls == []
            refused = {"model": name, "alias": "champion", "version": v1}
            assert metric("mercato_model_refused_total", **refused, reason="download") == 2.0
            errors = _records(caplog, logging.ERROR)
            assert len(errors) == 2
            for rec in errors:
                assert (rec.alias, rec.version, rec.reason) == ("champion", v1, "download")  # type: ignore[attr-defined]
                assert "FileExistsError" in rec.getMessage()
            blocker.unlink()
            await w.poll()
            got = w.get("champion")
            assert got is not None and (got.model, got.info.version) == ("one", v1)
            swapped = [r for r in _records(caplog, logging.INFO) if hasattr(r, "previous_version")]
            assert [(r.version, r.previous_version) for r in swapped] == [(v1, None)]  # type: ignore[attr-defined]

            # A broken version: refused once with its reason, the alias keeps v1 and
            # says so, and the swap log names the version it replaced.
            bad = await asyncio.to_thread(store.register, "bad", "champion")
            await w.poll()
            await w.poll()
            assert (
                metric(
                    "mercato_model_refused_total",
                    model=name,
                    alias="champion",
                    version=bad,
                    reason="invalid",
                )
                == 1.0
            )
            rec = _records(caplog, logging.ERROR)[-1]
            assert (rec.alias, rec.version, rec.reason) == ("champion", bad, "invalid")  # type: ignore[attr-defined]
            assert f"keeps serving version {v1}" in rec.getMessage()
            assert "ModelRejected: value is 'bad'" in rec.getMessage()  # why, for the operator
            v3 = await asyncio.to_thread(store.register, "three", "champion")
            await w.poll()
            swapped = [r for r in _records(caplog, logging.INFO) if hasattr(r, "previous_version")]
            assert (swapped[-1].version, swapped[-1].previous_version) == (v3, v1)  # type: ignore[attr-defined]
            assert heard == [v1, v3]
            swaps = metric("mercato_model_swaps_total", model=name, alias="champion")
            assert swaps == 2.0
            failed = [r for r in _records(caplog, logging.ERROR) if r.exc_info]
            assert len(failed) == 2
            assert all(r.alias == "champion" for r in failed)  # type: ignore[attr-defined]
            # Two versions loaded (v1, v3): the load time histogram holds two real times.
            elapsed = time.monotonic() - started
            count = metric("mercato_model_load_seconds_count", model=name)
            total = metric("mercato_model_load_seconds_sum", model=name)
            assert count == 2.0 and total is not None and 0 < total < elapsed
            loads = [r for r in _records(caplog, logging.INFO) if hasattr(r, "seconds")]
            assert [(r.alias, r.version) for r in loads] == [("champion", v1), ("champion", v3)]  # type: ignore[attr-defined]
            assert all(0 < r.seconds < elapsed for r in loads)  # type: ignore[attr-defined]
        finally:
            await w.stop()

    started = time.monotonic()
    asyncio.run(run())
