"""gRPC server of the retrieval service: two-tower candidates over FAISS.

Every watched registry alias (``champion``, ``challenger``, and any alias a request
names) is kept loaded by a :class:`~services.models.watcher.ModelWatcher`. A request reads
the model of its alias once and uses only that object, so a swap never mixes versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import Counter, Gauge

from mercato.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from services.common.deadline import ensure_time_left
from services.common.errors import NotFound, ResourceExhausted, Unavailable, require
from services.common.server import BaseService, run_service
from services.models.registry import ModelVersionInfo
from services.models.two_tower import ItemFeatures, UserQuery
from services.models.watcher import LoadedModel, ModelWatcher
from services.retrieval.merge import (
    SOURCE_ITEM2ITEM,
    SOURCE_TWO_TOWER,
    MergeConfig,
    Sources,
    fill_columns,
    fill_merged,
    fuse,
    fuse_sources,
    gather_sources,
    merge_config,
)
from services.retrieval.model import (
    IndexConfig,
    IndexState,
    RetrievalModel,
    RowFilter,
    load_retrieval_model,
)
from services.retrieval.settings import RetrievalSettings

log = logging.getLogger("mercato.retrieval")

MAX_ITEM_ID_BYTES = 128
MAX_FILTER_IDS = 10_000
MAX_CATEGORIES = 1_000
MAX_ANCHORS = 100
MAX_INDEX_ITEMS = 10_000
# (item id, score, source): candidates are built as tuples and written into the response
# with ``repeated.add`` (4x cheaper than building Candidate messages and copying them).
Cand = tuple[str, float, int]
ALIAS_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")

SHORT_RESULTS = Counter(
    "mercato_retrieval_short_results_total",
    "Calls that returned fewer than k items because filters left fewer.",
    ["method"],
)
INDEX_ITEMS = Gauge(
    "mercato_retrieval_index_items",
    "Items searchable per loaded alias (catalog plus items added by IndexItems).",
    ["alias"],
)


def surface_name(surface: int) -> str:
    """SURFACE_PRODUCT -> "product"; unspecified -> ""."""
    if surface == common_pb2.SURFACE_UNSPECIFIED:
        return ""
    try:
        return common_pb2.Surface.Name(surface).removeprefix("SURFACE_").lower()  # type: ignore[arg-type]
    except ValueError:
        return ""


def cart_ids(profile: common_pb2.Profile, context: common_pb2.Context) -> list[str]:
    """Cart of the request: the context's when given, else the stored cart."""
    if context.cart_item_ids:
        return list(context.cart_item_ids)
    return [line.item_id for line in profile.cart.lines]


def user_query(profile: common_pb2.Profile, context: common_pb2.Context) -> UserQuery:
    """What the user tower reads; an unknown customer has only context and attributes."""
    attrs = {**dict(profile.attributes), **dict(context.attributes)}
    return UserQuery(
        recent_item_ids=[r.item_id for r in profile.recent_items],
        purchased_item_ids=[p.item_id for p in profile.purchases],
        cart_item_ids=cart_ids(profile, context),
        anchor_item_id=context.anchor_item_id,
        surface=surface_name(context.surface),
        country=context.country or profile.country or attrs.get("country", ""),
        segment=profile.segment or attrs.get("segment", ""),
        price_band=profile.price_band or attrs.get("price_band", ""),
        category_affinity=dict(profile.category_affinity),
    )


REASON_MODEL = common_pb2.REASON_MODEL


def fill(repeated: Any, cands: list[Cand]) -> None:
    """Append candidates to a repeated Candidate field."""
    add = repeated.add
    for item_id, score, source in cands:
        add(item_id=item_id, score=score, source=source)


def _check_k(k: int, max_k: int) -> None:
    require(1 <= k <= max_k, f"k must be between 1 and {max_k}, got {k}")


def _check_ids(ids: Sequence[str], what: str, limit: int) -> None:
    require(len(ids) <= limit, f"at most {limit} {what}, got {len(ids)}")
    for i in ids:
        require(
            0 < len(i.encode()) <= MAX_ITEM_ID_BYTES,
            f"{what}: item ids must be 1 to {MAX_ITEM_ID_BYTES} bytes, got {i[:40]!r}",
        )


def row_filter(
    model: RetrievalModel,
    st: IndexState,
    f: retrieval_pb2.Filters,
    profile: common_pb2.Profile,
    context: common_pb2.Context | None,
    extra_exclude: Sequence[int] = (),
) -> RowFilter:
    """A request's hard filters in row space (INVALID_ARGUMENT on bad ids)."""
    _check_ids(f.exclude_item_ids, "exclude_item_ids", MAX_FILTER_IDS)
    require(
        len(f.categories) <= MAX_CATEGORIES,
        f"at most {MAX_CATEGORIES} categories, got {len(f.categories)}",
    )
    excl: set[int] = set(extra_exclude)
    ids: list[str] = list(f.exclude_item_ids)
    if f.exclude_purchased:
        ids += [p.item_id for p in profile.purchases]
    if f.exclude_in_cart:
        ids += [line.item_id for line in profile.cart.lines]
        if context is not None:
            ids += list(context.cart_item_ids)
    for i in ids:
        r = model.row_of(st, i)
        if r is not None:
            excl.add(r)
    cats = None
    if f.categories:
        cats = np.array(
            sorted({st.category_code[c] for c in f.categories if c in st.category_code}),
            dtype=np.int64,
        )
    return RowFilter(
        exclude=np.fromiter(excl, dtype=np.int64, count=len(excl)),
        categories=cats,
        in_stock_only=f.in_stock_only,
    )


def request_sources(
    model: RetrievalModel,
    st: IndexState,
    request: retrieval_pb2.RetrieveRequest,
    checkpoint: Callable[[str], None] = lambda stage: None,
) -> Sources:
    """``Retrieve`` up to the fusion: the request's filters, the user tower, the
    two-tower's search and the history item-to-item reads (INVALID_ARGUMENT on bad ids).
    ``checkpoint(stage)`` runs before each stage (the service checks its deadline there)."""
    ctx = request.context
    _check_ids(list(ctx.cart_item_ids), "context.cart_item_ids", MAX_FILTER_IDS)
    flt = row_filter(model, st, request.filters, request.profile, ctx)
    checkpoint("user tower")
    query = user_query(request.profile, ctx)
    q = model.encode_user(query)
    checkpoint("search")
    return gather_sources(model, st, query, request.k, flt, q)


def sources_response(
    model: RetrievalModel,
    st: IndexState,
    request: retrieval_pb2.RetrieveRequest,
    sources: Sources,
    merge: MergeConfig,
) -> retrieval_pb2.RetrieveResponse:
    """``Retrieve``'s answer from a request's sources fused with ``merge``'s weights."""
    merged = fuse_sources(model, st, sources, merge)
    if len(merged) < request.k:
        SHORT_RESULTS.labels("Retrieve").inc()
    resp = retrieval_pb2.RetrieveResponse()
    if request.columns:
        fill_columns(resp.columns, model, st, merged)
    else:
        fill_merged(resp.candidates, model, st, merged)
    return resp


def retrieve_response(
    model: RetrievalModel,
    st: IndexState,
    request: retrieval_pb2.RetrieveRequest,
    merge: MergeConfig,
    checkpoint: Callable[[str], None] = lambda stage: None,
) -> retrieval_pb2.RetrieveResponse:
    """Everything ``Retrieve`` does after choosing the model (filters, user tower, both
    sources, the merge), without the model version: the offline replay
    (:mod:`training.replay`) calls it too, or its two halves (:func:`request_sources`
    once, then :func:`sources_response` per fusion weights)."""
    sources = request_sources(model, st, request, checkpoint)
    return sources_response(model, st, request, sources, merge)


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """RPC handlers over the watcher's loaded models."""

    def __init__(self, settings: RetrievalSettings, watcher: ModelWatcher[RetrievalModel]) -> None:
        self.settings = settings
        self.watcher = watcher

    # ------------------------------------------------------------------ helpers

    def _merge(self, model: RetrievalModel) -> MergeConfig:
        return merge_config(model, self.settings.two_tower_weight, self.settings.item2item_weight)

    def _model(self, alias: str) -> LoadedModel[RetrievalModel]:
        alias = alias or self.settings.default_alias
        require(
            bool(ALIAS_RE.match(alias)),
            f"model_alias must be 1-64 letters, digits, '_' or '-', got {alias[:70]!r}",
        )
        loaded = self.watcher.get(alias)
        if loaded is not None:
            return loaded
        name = self.settings.model_name
        if alias not in self.watcher.aliases:
            if len(self.watcher.aliases) >= self.settings.max_aliases:
                raise ResourceExhausted(
                    f"this replica already watches {len(self.watcher.aliases)} aliases "
                    f"(max_aliases); alias {alias!r} is not one of them"
                )
            self.watcher.watch(alias)
            raise Unavailable(
                f"alias {alias!r} of model {name!r} is not loaded yet; it is being looked "
                "up in the registry, retry shortly"
            )
        raise Unavailable(
            f"no version of model {name!r} is loaded for alias {alias!r} (registry "
            f"{self.settings.resolved_tracking_uri()}). Train one with "
            f"`mercato train retrieval` and promote it with `mercato promote` "
            f"(it registers as 'challenger'; promote moves 'champion' to it); this replica "
            f"checks the registry every {self.settings.poll_interval_s:g} s"
        )

    @staticmethod
    def _version(loaded: LoadedModel[RetrievalModel]) -> common_pb2.ModelVersion:
        i = loaded.info
        return common_pb2.ModelVersion(
            name=i.name, version=i.version, alias=i.alias, run_id=i.run_id
        )

    def _candidates(
        self,
        model: RetrievalModel,
        st: IndexState,
        rows: np.ndarray,
        scores: np.ndarray,
        source: int,
    ) -> list[Cand]:
        item_id = model.item_id
        return [
            (item_id(st, r), s, source) for r, s in zip(rows.tolist(), scores.tolist(), strict=True)
        ]

    # ------------------------------------------------------------------ RPCs

    # Retrieve, RetrieveRelated and ListLoadedModels never wait: their synchronous twins
    # (``X_sync``) are the whole work, run on the pool threads with server_mode=sync.

    async def Retrieve(
        self, request: retrieval_pb2.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.RetrieveResponse:
        return self.Retrieve_sync(request, context)

    def Retrieve_sync(
        self, request: retrieval_pb2.RetrieveRequest, context: Any
    ) -> retrieval_pb2.RetrieveResponse:
        _check_k(request.k, self.settings.max_k)
        loaded = self._model(request.model_alias)
        model = loaded.model
        st = model.state  # one snapshot for the whole call
        resp = retrieve_response(
            model, st, request, self._merge(model), lambda stage: ensure_time_left(context, stage)
        )
        resp.model.CopyFrom(self._version(loaded))
        return resp

    async def RetrieveRelated(
        self, request: retrieval_pb2.RetrieveRelatedRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.RetrieveRelatedResponse:
        return self.RetrieveRelated_sync(request, context)

    def RetrieveRelated_sync(
        self, request: retrieval_pb2.RetrieveRelatedRequest, context: Any
    ) -> retrieval_pb2.RetrieveRelatedResponse:
        _check_k(request.k, self.settings.max_k)
        require(
            1 <= len(request.item_ids) <= MAX_ANCHORS,
            f"item_ids must name 1 to {MAX_ANCHORS} anchor items, got {len(request.item_ids)}",
        )
        _check_ids(request.item_ids, "item_ids", MAX_ANCHORS)
        kind = request.kind
        require(
            kind
            in (
                common_pb2.RELATION_KIND_SIMILAR,
                common_pb2.RELATION_KIND_COMPLEMENT,
                common_pb2.RELATION_KIND_UPSELL,
            ),
            "kind must be RELATION_KIND_SIMILAR, _COMPLEMENT or _UPSELL",
        )
        loaded = self._model(request.model_alias)
        model = loaded.model
        st = model.state
        anchors: list[int] = []
        unknown: list[str] = []
        for i in request.item_ids:
            r = model.row_of(st, i)
            if r is None:
                unknown.append(i)
            elif r not in anchors:
                anchors.append(r)
        if not anchors:
            raise NotFound(
                f"none of the anchor items is in the index of {loaded.info.name} version "
                f"{loaded.info.version}: {', '.join(unknown[:10])} (new catalog items are "
                "added by IndexItems)"
            )
        flt = row_filter(model, st, request.filters, request.profile, None, extra_exclude=anchors)
        k = request.k
        ensure_time_left(context, "search")
        if kind == common_pb2.RELATION_KIND_UPSELL:
            cands = self._upsell(model, st, anchors, k, flt)
        elif kind == common_pb2.RELATION_KIND_COMPLEMENT:
            cands = self._complements(model, st, anchors, k, flt)
        else:
            cands = self._similar(model, st, anchors, k, flt, common_pb2.REASON_SIMILAR)
        if len(cands) < k:
            SHORT_RESULTS.labels("RetrieveRelated").inc()
        resp = retrieval_pb2.RetrieveRelatedResponse(
            model=self._version(loaded), unknown_item_ids=unknown
        )
        fill(resp.candidates, cands)
        return resp

    def _similar(
        self,
        model: RetrievalModel,
        st: IndexState,
        anchors: list[int],
        k: int,
        flt: RowFilter,
        source: int,
    ) -> list[Cand]:
        res = model.search(st, model.item_query(st, anchors), k, flt)
        i2i = model.item2item
        merge = self._merge(model)
        if i2i is None or merge.item2item_weight <= 0:
            return self._candidates(model, st, res.rows, res.scores, source)
        # The anchors' item-to-item neighbours, fused by rank with the embedding search.
        hist = np.asarray(anchors, dtype=np.int64)
        rows, _ = i2i.top(hist, max(2 * k, k + len(flt.exclude)), exclude=flt.exclude)
        rows = rows[flt.mask(st, rows)][:k]
        if len(rows) == 0:
            return self._candidates(model, st, res.rows, res.scores, source)
        lists = {
            SOURCE_TWO_TOWER: (res.rows, max(merge.two_tower_weight, 1e-6)),
            SOURCE_ITEM2ITEM: (rows, merge.item2item_weight),
        }
        rows, fused, _ = fuse(lists, k)
        return self._candidates(model, st, rows, fused, source)

    def _upsell(
        self, model: RetrievalModel, st: IndexState, anchors: list[int], k: int, flt: RowFilter
    ) -> list[Cand]:
        """Per anchor: similar items of its category priced above it; merged by score."""
        best: dict[int, float] = {}
        for a in anchors:
            code = int(st.item_cat[a])
            allowed = flt.categories
            if allowed is not None and code not in allowed:
                continue
            f = RowFilter(
                exclude=flt.exclude,
                categories=np.array([code], dtype=np.int64),
                in_stock_only=flt.in_stock_only,
                min_price=float(st.item_price[a]),
            )
            res = model.search(st, model.item_query(st, [a]), k, f)
            for r, s in zip(res.rows.tolist(), res.scores.tolist(), strict=True):
                if s > best.get(r, -np.inf):
                    best[r] = s
        top = sorted(best.items(), key=lambda t: (-t[1], t[0]))[:k]
        rows = np.array([r for r, _ in top], dtype=np.int64)
        scores = np.array([s for _, s in top], dtype=np.float32)
        return self._candidates(model, st, rows, scores, common_pb2.REASON_UPSELL)

    def _complements(
        self, model: RetrievalModel, st: IndexState, anchors: list[int], k: int, flt: RowFilter
    ) -> list[Cand]:
        """Basket co-occurrence from the bundle; filled up with similar items when the
        bundle has none (or too few) for these anchors."""
        scores: dict[int, float] = {}
        for a in anchors:
            for item_id, s in model.complements_of(model.item_id(st, a)):
                r = model.row_of(st, item_id)
                if r is not None:
                    scores[r] = scores.get(r, 0.0) + float(s)
        out: list[Cand] = []
        if scores:
            rows = np.fromiter(scores, dtype=np.int64, count=len(scores))
            vals = np.array([scores[int(r)] for r in rows], dtype=np.float32)
            keep = flt.mask(st, rows)
            rows, vals = rows[keep], vals[keep]
            order = np.lexsort((rows, -vals))[:k]
            out = self._candidates(
                model, st, rows[order], vals[order], common_pb2.REASON_COMPLEMENT
            )
        if len(out) < k:
            taken = np.array([model.row_of(st, c[0]) for c in out], dtype=np.int64)
            fill = RowFilter(
                exclude=np.concatenate([flt.exclude, taken]),
                categories=flt.categories,
                in_stock_only=flt.in_stock_only,
            )
            out += self._similar(model, st, anchors, k - len(out), fill, common_pb2.REASON_SIMILAR)
        return out

    async def IndexItems(
        self, request: retrieval_pb2.IndexItemsRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.IndexItemsResponse:
        n = len(request.items)
        require(1 <= n <= MAX_INDEX_ITEMS, f"items must hold 1 to {MAX_INDEX_ITEMS}, got {n}")
        seen: set[str] = set()
        for it in request.items:
            _check_ids([it.item_id], "items", 1)
            require(it.item_id not in seen, f"item {it.item_id!r} is listed twice")
            seen.add(it.item_id)
            require(
                it.price >= 0 and np.isfinite(it.price),
                f"item {it.item_id!r}: price must be >= 0, got {it.price}",
            )
            require(it.stock >= 0, f"item {it.item_id!r}: stock must be >= 0, got {it.stock}")
        if request.model_alias:
            targets = [self._model(request.model_alias)]
        else:
            targets = list(self.watcher.loaded().values())
            if not targets:
                self._model("")  # raises UNAVAILABLE with the how-to message
        features = [
            ItemFeatures(
                item_id=it.item_id,
                category=it.category,
                price=float(it.price),
                attributes=dict(it.attributes),
            )
            for it in request.items
        ]
        stock = [int(it.stock) for it in request.items]
        added_ids: set[str] = set()
        done: set[int] = set()
        versions: list[common_pb2.ModelVersion] = []
        for loaded in targets:
            model = loaded.model
            versions.append(self._version(loaded))
            if id(model) in done:  # one version under two aliases: one index
                continue
            done.add(id(model))
            before = model.state
            new = {f.item_id for f in features if model.row_of(before, f.item_id) is None}
            try:
                await asyncio.to_thread(model.index_items, features, stock)
            except OverflowError as e:
                raise ResourceExhausted(str(e)) from e
            added_ids |= new
            INDEX_ITEMS.labels(loaded.info.alias).set(model.state.n_total)
        log.info(
            "items indexed",
            extra={"items": n, "added": len(added_ids), "versions": [v.version for v in versions]},
        )
        return retrieval_pb2.IndexItemsResponse(
            added=len(added_ids), updated=n - len(added_ids), models=versions
        )

    async def ListLoadedModels(
        self, request: retrieval_pb2.ListLoadedModelsRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.ListLoadedModelsResponse:
        return self.ListLoadedModels_sync(request, context)

    def ListLoadedModels_sync(
        self, request: retrieval_pb2.ListLoadedModelsRequest, context: Any
    ) -> retrieval_pb2.ListLoadedModelsResponse:
        out = []
        for _alias, loaded in sorted(self.watcher.loaded().items()):
            m = loaded.model
            out.append(
                retrieval_pb2.LoadedModel(
                    model=self._version(loaded),
                    item_count=m.state.n_total,
                    dimension=m.dim,
                    index_type=m.index_type,
                )
            )
        return retrieval_pb2.ListLoadedModelsResponse(models=out)


def index_config(settings: RetrievalSettings) -> IndexConfig:
    return IndexConfig(
        exact_max_items=settings.exact_max_items,
        min_recall=settings.min_recall,
        recall_k=settings.recall_k,
        recall_queries=settings.recall_queries,
        ann_must_beat_exact=settings.ann_must_beat_exact,
        hnsw_m=settings.hnsw_m,
        hnsw_ef_construction=settings.hnsw_ef_construction,
        hnsw_ef_search=settings.hnsw_ef_search,
        ann=settings.ann_index,
        ivf_nlist=settings.ivf_nlist,
        ivf_nprobe=settings.ivf_nprobe,
        mmap=settings.mmap_index,
        oversample=settings.oversample,
        max_fetch=settings.max_fetch,
        exact_subset_max=settings.exact_subset_max,
        max_new_items=settings.max_new_items,
    )


def _load(cfg: IndexConfig, path: Path, info: ModelVersionInfo) -> RetrievalModel:
    return load_retrieval_model(path, info, cfg)


class RetrievalService(BaseService):
    """The retrieval service as the runtime runs it."""

    name = "retrieval"

    def __init__(self, settings: RetrievalSettings) -> None:
        super().__init__(settings)
        self.rsettings = settings
        self.watcher: ModelWatcher[RetrievalModel] = ModelWatcher(
            model_name=settings.model_name,
            aliases=settings.alias_list(),
            tracking_uri=settings.resolved_tracking_uri(),
            cache_dir=settings.resolved_cache_dir(),
            load=partial(_load, index_config(settings)),
            poll_interval_s=settings.poll_interval_s,
            service=self.name,
        )
        self._serving = False
        self._health_tasks: set[asyncio.Task[None]] = set()
        self._start_task: asyncio.Task[None] | None = None
        self.watcher.add_listener(self._on_models_changed)

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(
            RetrievalServicer(self.rsettings, self.watcher), server
        )
        return [retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name]

    def _on_models_changed(self) -> None:
        for alias, loaded in self.watcher.loaded().items():
            INDEX_ITEMS.labels(alias).set(loaded.model.state.n_total)
        serving = self.watcher.get(self.rsettings.default_alias) is not None
        if serving != self._serving:
            self._serving = serving
            task = asyncio.get_running_loop().create_task(self.set_serving(serving))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    async def start(self) -> None:
        """Start watching the registry in the background (the first look-up imports MLflow
        and may download a large bundle; a SIGTERM meanwhile must stop the process at once).
        Health stays NOT_SERVING until the default alias has a model."""
        self._start_task = asyncio.get_running_loop().create_task(self._first_load())

    async def _first_load(self) -> None:
        await self.watcher.start()
        if self.watcher.get(self.rsettings.default_alias) is None:
            log.warning(
                "no model loaded yet: NOT_SERVING until one is promoted",
                extra={
                    "model": self.rsettings.model_name,
                    "alias": self.rsettings.default_alias,
                    "hint": "mercato train retrieval && mercato promote",
                },
            )

    async def stop(self) -> None:
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._start_task
        await self.watcher.stop()


def main() -> None:
    """Run the retrieval service until SIGTERM."""
    run_service(RetrievalService, RetrievalSettings())


if __name__ == "__main__":
    main()
