"""Fixtures of the profile tests: a real Redis per session, stores of both backends."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.profile.logic import ProfileConfig
from services.profile.store.base import ProfileStore
from services.profile.store.redis import RedisStore
from services.profile.store.sqlite import SqliteStore
from tests.profile.redis_proc import RedisProc

_prefixes = itertools.count()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    proc = RedisProc(tmp_path_factory.mktemp("redis")).start()
    yield proc
    proc.stop()


@pytest.fixture
def cfg() -> ProfileConfig:
    return ProfileConfig(recent_items_limit=5, purchases_limit=0)


def make_test_store(
    backend: str, tmp_path: Path, redis_url: str, cfg: ProfileConfig
) -> ProfileStore:
    if backend == "sqlite":
        return SqliteStore(tmp_path / "profile.db", cfg)
    return RedisStore(redis_url, cfg, prefix=f"test{next(_prefixes)}:")


@pytest.fixture(params=["sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, cfg: ProfileConfig
) -> AsyncIterator[ProfileStore]:
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else ""
    st = make_test_store(request.param, tmp_path, url, cfg)
    await st.open()
    yield st
    if isinstance(st, RedisStore):
        await st.flush_prefix()
    await st.close()
