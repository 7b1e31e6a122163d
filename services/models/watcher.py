"""Follow registry aliases of one MLflow model and keep what they point at loaded.

A :class:`ModelWatcher` polls the aliases of one registered model (``champion``,
``challenger``, any alias a request asks for). When an alias points at a new version, the
watcher downloads that version's bundle artifact and hands the local directory to the
service's ``load`` callable, in a daemon worker thread (never on the event loop). ``load``
loads *and validates*: when it raises, the version is refused (log line + the
``mercato_model_refused_total`` counter) and the alias keeps serving what it had. Once a
version loads, the alias is swapped with one reference assignment of a new immutable
snapshot, so a request that read :meth:`ModelWatcher.get` keeps one consistent model.

The same version under two aliases is loaded once and shared. Versions that fail to load
or validate are remembered and not retried (a new version, or a restart, retries);
download and registry errors are transient and retried on the next poll.

Both services with registered models use it: retrieval (``mercato-two-tower``) and
ranking (``mercato-ranker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from services.common.memory import trim
from services.common.tasks import cancel_tasks
from services.models.registry import (
    ModelVersionInfo,
    download_bundle,
    download_run_bundle,
    resolve_alias,
)

log = logging.getLogger("mercato.models.watcher")

T = TypeVar("T")

MODEL_REFUSED = Counter(
    "mercato_model_refused_total",
    "Model versions refused (download failed, load failed, or validation failed).",
    ["model", "alias", "version", "reason"],
)
MODEL_LOADED_VERSION = Gauge(
    "mercato_model_loaded_version",
    "Registry version serving an alias on this replica (absent until one is loaded).",
    ["model", "alias"],
)
MODEL_SWAPS = Counter(
    "mercato_model_swaps_total", "Alias swaps to a newly loaded version.", ["model", "alias"]
)
MODEL_LOAD_SECONDS = Histogram(
    "mercato_model_load_seconds",
    "Time to download and load one model version.",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
MODEL_POLLS = Counter(
    "mercato_model_polls_total",
    "Registry look-ups of an alias done (whatever their outcome).",
    ["model", "alias"],
)
MODEL_POLL_ERRORS = Counter(
    "mercato_model_poll_errors_total",
    "Registry look-ups of an alias that failed (store unreachable, unknown alias).",
    ["model", "alias"],
)

# Reasons of MODEL_REFUSED.
REASON_DOWNLOAD = "download"  # the artifact could not be fetched (retried next poll)
REASON_LOAD = "load"  # load() raised something else: unreadable or broken files
REASON_INVALID = "invalid"  # load() raised ModelRejected: validation failed


R = TypeVar("R")


async def run_in_daemon_thread(fn: Callable[..., R], *args: Any) -> R:
    """Run blocking ``fn(*args)`` in a new daemon thread and await its result.

    Like ``asyncio.to_thread`` but the thread never holds up process exit: a SIGTERM that
    arrives while MLflow is still importing or a large bundle is downloading stops the
    service at once instead of after the download.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[R] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        try:
            result: Any = fn(*args)
            ok = True
        except BaseException as e:  # handed to the awaiting task
            result, ok = e, False
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(
        target=run, name=f"model-{getattr(fn, '__name__', 'work')}", daemon=True
    ).start()
    return await fut


class ModelRejected(Exception):
    """Raised by a ``load`` callable when a version loads but fails validation."""


@dataclass(frozen=True)
class LoadedModel(Generic[T]):
    """One loaded model version as an alias serves it."""

    info: ModelVersionInfo
    model: T
    loaded_at: float


def _version_key(version: str) -> float:
    try:
        return float(version)
    except ValueError:
        return float("nan")


class ModelWatcher(Generic[T]):
    """Keeps every watched alias of ``model_name`` loaded; see the module docstring."""

    def __init__(
        self,
        *,
        model_name: str,
        aliases: Sequence[str],
        tracking_uri: str,
        cache_dir: Path,
        load: Callable[[Path, ModelVersionInfo], T],
        poll_interval_s: float = 10.0,
        service: str = "",
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be positive")
        self.model_name = model_name
        self.tracking_uri = tracking_uri
        self.cache_dir = Path(cache_dir)
        self.poll_interval_s = float(poll_interval_s)
        self.service = service
        self._load = load
        self._aliases: list[str] = []
        for a in aliases:
            if a and a not in self._aliases:
                self._aliases.append(a)
        # alias -> LoadedModel; replaced as a whole (never mutated after publication).
        self._snapshot: Mapping[str, LoadedModel[T]] = MappingProxyType({})
        self._refused: dict[str, str] = {}  # version -> reason (load / invalid)
        self._missing_logged: set[str] = set()
        self._listeners: list[Callable[[], None]] = []
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._downloaded: set[str] = set()  # cache folders this watcher wrote

    # ------------------------------------------------------------------ public API

    @property
    def aliases(self) -> list[str]:
        """Aliases being watched, in the order they were added."""
        return list(self._aliases)

    async def start(self) -> None:
        """Poll every alias once (waiting for the loads), then keep polling in the background."""
        self._stopped = False
        self._loop = asyncio.get_running_loop()
        await self.poll()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"watch-{self.model_name}"
            )

    async def stop(self) -> None:
        """Stop polling; loaded models stay readable."""
        self._stopped = True
        task, self._task = self._task, None
        await cancel_tasks(task, *self._pending)

    def get(self, alias: str) -> LoadedModel[T] | None:
        """The model serving ``alias`` now, or None. Lock-free; the result never changes."""
        return self._snapshot.get(alias)

    def loaded(self) -> dict[str, LoadedModel[T]]:
        """Every loaded alias (a copy)."""
        return dict(self._snapshot)

    def watch(self, alias: str) -> None:
        """Start watching ``alias`` (idempotent). Inside a running event loop it is polled
        right away in the background; otherwise on the next poll."""
        if not alias or alias in self._aliases:
            return
        self._aliases.append(alias)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # A pool thread of the synchronous server: poll on the watcher's own loop.
            started = getattr(self, "_loop", None)
            if started is not None and not self._stopped and not started.is_closed():
                started.call_soon_threadsafe(self._poll_soon, alias)
            return
        if self._stopped:
            return
        self._poll_soon(alias, loop)

    def _poll_soon(self, alias: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._stopped:
            return
        loop = loop or asyncio.get_running_loop()
        task = loop.create_task(self._poll_locked([alias]), name=f"watch-{alias}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` (on the event loop) after every change of the loaded set."""
        self._listeners.append(fn)

    async def poll(self) -> None:
        """Check every watched alias once and load what changed."""
        await self._poll_locked(list(self._aliases))

    # ------------------------------------------------------------------ internals

    async def _run(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the poller die
                log.exception("model poll failed", extra=self._extra())

    async def _poll_locked(self, aliases: list[str]) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            for alias in aliases:
                await self._poll_alias(alias)

    def _extra(self, **kw: object) -> dict[str, object]:
        return {"model": self.model_name, "service": self.service, **kw}

    async def _poll_alias(self, alias: str) -> None:
        try:
            await self._check_alias(alias)
        finally:
            MODEL_POLLS.labels(self.model_name, alias).inc()

    async def _check_alias(self, alias: str) -> None:
        current = self._snapshot.get(alias)
        try:
            info = await run_in_daemon_thread(
                resolve_alias, self.model_name, alias, self.tracking_uri
            )
        except LookupError as e:
            MODEL_POLL_ERRORS.labels(self.model_name, alias).inc()
            if alias not in self._missing_logged:
                self._missing_logged.add(alias)
                log.warning(
                    "alias not in the registry%s",
                    "; keeping the loaded version" if current else "",
                    extra=self._extra(alias=alias, error=str(e)),
                )
            return
        except Exception as e:
            MODEL_POLL_ERRORS.labels(self.model_name, alias).inc()
            log.warning(
                "registry look-up failed",
                extra=self._extra(alias=alias, error=f"{type(e).__name__}: {e}"),
            )
            return
        self._missing_logged.discard(alias)
        if current is not None and current.info.version == info.version:
            return
        if info.version in self._refused:
            return  # already refused and logged; a new version or a restart retries
        # The same version under another alias: share the loaded model.
        for other in self._snapshot.values():
            if other.info.version == info.version:
                self._publish(alias, LoadedModel(info, other.model, other.loaded_at), current)
                return
        loaded = await self._download_and_load(alias, info)
        if loaded is not None:
            self._publish(alias, loaded, current)
        trim()  # what loading (or a refused version) allocated and freed

    async def _download_and_load(self, alias: str, info: ModelVersionInfo) -> LoadedModel[T] | None:
        t0 = time.perf_counter()
        try:
            local = await run_in_daemon_thread(self._download, info)
        except Exception as e:
            self._refuse(alias, info.version, REASON_DOWNLOAD, e, remember=False)
            return None
        try:
            model = await run_in_daemon_thread(self._load, local, info)
        except ModelRejected as e:
            self._refuse(alias, info.version, REASON_INVALID, e, remember=True)
            return None
        except Exception as e:
            self._refuse(alias, info.version, REASON_LOAD, e, remember=True)
            return None
        seconds = time.perf_counter() - t0
        MODEL_LOAD_SECONDS.labels(self.model_name).observe(seconds)
        log.info(
            "model version loaded",
            extra=self._extra(alias=alias, version=info.version, seconds=round(seconds, 3)),
        )
        return LoadedModel(info=info, model=model, loaded_at=time.time())

    def _download(self, info: ModelVersionInfo) -> Path:
        """Download the version's bundle into ``cache_dir/<model>/v<version>``.

        Downloads go to a temporary folder renamed into place, so a half-written
        download is never loaded; a complete copy already in the cache is reused.
        """
        root = self.cache_dir / self.model_name.replace("/", "_")
        final = root / f"v{info.version}"
        done = final / ".complete"
        if done.is_file():
            return final / done.read_text().strip()
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{info.version}-{uuid.uuid4().hex[:8]}"
        try:
            # Download by run id: the alias may have moved since it was resolved.
            _, local = download_bundle_by_run(info, self.tracking_uri, tmp)
            rel = local.resolve().relative_to(tmp.resolve())
            (tmp / ".complete").write_text(str(rel))
            shutil.rmtree(final, ignore_errors=True)
            try:
                tmp.rename(final)
            except OSError:
                if not done.is_file():  # lost a race with nobody: give up on this poll
                    raise
            self._downloaded.add(final.name)
            return final / rel
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _refuse(
        self, alias: str, version: str, reason: str, error: BaseException, *, remember: bool
    ) -> None:
        MODEL_REFUSED.labels(self.model_name, alias, version, reason).inc()
        if remember:
            self._refused[version] = reason
        current = self._snapshot.get(alias)
        log.error(
            "model version refused (%s): %s; %s",
            reason,
            f"{type(error).__name__}: {error}",
            (
                f"alias {alias!r} keeps serving version {current.info.version}"
                if current
                else f"alias {alias!r} has no model loaded"
            ),
            extra=self._extra(alias=alias, version=version, reason=reason),
        )

    def _publish(self, alias: str, loaded: LoadedModel[T], previous: LoadedModel[T] | None) -> None:
        if alias != loaded.info.alias:
            loaded = replace(loaded, info=replace(loaded.info, alias=alias))
        snap = dict(self._snapshot)
        snap[alias] = loaded
        self._snapshot = MappingProxyType(snap)  # the swap: one reference assignment
        version = _version_key(loaded.info.version)
        if version == version:  # not NaN
            MODEL_LOADED_VERSION.labels(self.model_name, alias).set(version)
        MODEL_SWAPS.labels(self.model_name, alias).inc()
        log.info(
            "alias now serves version %s",
            loaded.info.version,
            extra=self._extra(
                alias=alias,
                version=loaded.info.version,
                previous_version=previous.info.version if previous else None,
            ),
        )
        self._prune_cache()
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:
                log.exception("model listener failed", extra=self._extra(alias=alias))

    def _prune_cache(self) -> None:
        """Delete downloaded versions that no alias serves any more."""
        root = self.cache_dir / self.model_name.replace("/", "_")
        if not root.is_dir():
            return
        keep = {f"v{m.info.version}" for m in self._snapshot.values()}
        for name in sorted(self._downloaded - keep):
            # Models that memory-map their files keep reading them after the unlink.
            shutil.rmtree(root / name, ignore_errors=True)
            self._downloaded.discard(name)


def download_bundle_by_run(
    info: ModelVersionInfo, tracking_uri: str, dst: Path
) -> tuple[ModelVersionInfo, Path]:
    """Download the bundle artifact of exactly ``info``'s run (not whatever the alias
    points at now) into ``dst``; returns ``(info, local bundle directory)``."""
    if not info.run_id:
        # A version without a run: fall back to resolving through the alias.
        return download_bundle(info.name, info.alias, tracking_uri, dst)
    return info, download_run_bundle(info, tracking_uri, dst)
