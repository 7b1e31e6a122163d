"""The console web application (Starlette): six pages drawn in the browser from the
JSON of ``/api/*``; every asset is served from ``mercato/console/static``.

Access: an operator key, checked against SHA-256 hashes in a keys file with the gateway's
own parser and checker (:class:`services.gateway.auth.ApiKeyAuthenticator`). The browser
signs in once (``POST /api/login``) and gets an HTTP-only session cookie; scripts send
the key in the ``x-api-key`` header. Nothing is writable: the only non-GET endpoints are
login and logout, and the only thing produced is the audience export (a download).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mercato.console import analytics as an
from mercato.console.sources import (
    EventLog,
    MetricsSampler,
    TwoTowerScorer,
    csv_bytes,
    overview_metrics,
    scorer_or_none,
    training_runs,
)

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
COOKIE = "mercato_console"
SESSION_SECONDS = 12 * 3600


@dataclass
class ConsoleConfig:
    """Where the console reads from."""

    events: EventLog
    keys_file: Path
    gateway: str = "127.0.0.1:50051"
    profile: str = "127.0.0.1:50052"
    gateway_api_key: str = ""
    tracking_uri: str = ""
    offers_file: Path | None = None
    sampler: MetricsSampler | None = None
    scorer: TwoTowerScorer | None = None
    cache_seconds: float = 300.0
    secure_cookie: bool = False
    warm: bool = True  # compute every page once at start
    extra: dict[str, Any] = field(default_factory=dict)


def json_safe(value: Any) -> Any:
    """NaN and infinities (an empty window's error, say) as null: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class Console:
    """State behind the routes: sessions, gRPC channels, cached page results."""

    def __init__(self, cfg: ConsoleConfig) -> None:
        from services.gateway.auth import ApiKeyAuthenticator

        self.cfg = cfg
        self.auth = ApiKeyAuthenticator.from_file(cfg.keys_file)
        self.sessions: dict[str, tuple[str, float]] = {}
        self._cache: dict[str, tuple[float, Any, Any]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._profile_channel: grpc.Channel | None = None

    # -- auth
    def check_key(self, key: str) -> str | None:
        from services.common.errors import ServiceError
        from services.gateway.auth import API_KEY_HEADER

        if not key:
            return None
        try:
            return self.auth("console", [(API_KEY_HEADER, key)])
        except ServiceError:
            return None

    def who(self, request: Request) -> str | None:
        key = request.headers.get("x-api-key", "")
        if key:
            return self.check_key(key)
        token = request.cookies.get(COOKIE, "")
        entry = self.sessions.get(token) if token else None
        if entry and entry[1] > time.time():
            return entry[0]
        return None

    # -- sources
    def profile_stub(self) -> Any:
        from mercato.v1 import profile_pb2_grpc
        from services.common.channels import channel_options, client_credentials
        from services.common.settings import ClientTlsSettings

        if self._profile_channel is None:
            creds = client_credentials(ClientTlsSettings())
            opts = channel_options()
            self._profile_channel = (
                grpc.secure_channel(self.cfg.profile, creds, options=opts)
                if creds
                else grpc.insecure_channel(self.cfg.profile, options=opts)
            )
        return profile_pb2_grpc.ProfileServiceStub(self._profile_channel)

    def items(self) -> pd.DataFrame:
        """The whole catalog through ``ListItems``."""
        from mercato.v1 import profile_pb2

        stub = self.profile_stub()
        rows, token = [], ""
        while True:
            resp = stub.ListItems(
                profile_pb2.ListItemsRequest(page_size=1000, page_token=token), timeout=30
            )
            rows += [
                {
                    "item_id": it.item_id,
                    "title": it.title,
                    "category": it.category,
                    "price": it.price,
                    "stock": it.stock,
                }
                for it in resp.items
            ]
            token = resp.next_page_token
            if not token:
                break
        cols = ["item_id", "title", "category", "price", "stock"]
        return pd.DataFrame(rows, columns=cols)

    def events(self) -> tuple[pd.DataFrame, an.Clock]:
        df = self.cfg.events.frame()
        return df, an.events_clock(df)

    def cached(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` cached for ``cache_seconds`` and while the export is unchanged."""
        lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            version = self.cfg.events.version
            hit = self._cache.get(key)
            if hit and time.time() - hit[0] < self.cfg.cache_seconds and hit[1] == version:
                return hit[2]
            value = fn()
            self._cache[key] = (time.time(), self.cfg.events.version, value)
            return value

    # -- pages
    def overview(self) -> dict[str, Any]:
        df, clock = self.events()
        metrics = (
            overview_metrics(self.cfg.sampler.snapshot()) if self.cfg.sampler else {"methods": []}
        )
        runs = self.cached("runs", self.runs)
        return {
            "clock": clock.as_json(),
            "metrics": metrics,
            "traffic": an.traffic_from_exposures(df),
            "runs": runs,
            "export": {
                "path": str(self.cfg.events.path),
                "events": len(df),
                "modified": pd.Timestamp(self.cfg.events.version, unit="s", tz="UTC").isoformat(),
            },
        }

    def runs(self) -> list[dict[str, Any]]:
        return training_runs(self.cfg.tracking_uri) if self.cfg.tracking_uri else []

    def demand(self) -> dict[str, Any]:
        df, clock = self.events()
        scorer = scorer_or_none(self.cfg.scorer)
        page = an.demand_page(df, self.items(), clock, scorer)
        page["model"] = self.cfg.scorer.label if scorer and self.cfg.scorer else None
        return page

    def trends(self) -> dict[str, Any]:
        df, clock = self.events()
        page = an.trends_page(df, clock)
        try:  # titles are a nicety: the page stands without the profile service
            titles = self.items().set_index("item_id")["title"].to_dict()
        except grpc.RpcError as exc:
            log.warning("no item titles: %s", exc)
            titles = {}
        for key in ("rising_items", "falling_items"):
            for row in page[key]:
                row["title"] = titles.get(row["item_id"], "")
        return page

    def customers(self) -> dict[str, Any]:
        df, clock = self.events()
        return an.customers_page(df, clock)

    def offers(self) -> dict[str, Any]:
        from services.gateway.abreport import ab_report
        from services.ranking.offers.catalog import Catalog

        df, clock = self.events()
        page: dict[str, Any] = {"clock": clock.as_json()}
        if self.cfg.offers_file is not None:
            page.update(an.offers_page(df, Catalog.load(self.cfg.offers_file), clock))
        else:
            page["offers"] = []
        window = float(self.cfg.extra.get("ab_window_seconds", 86_400.0))
        lines = ab_report(an.rows_for_report(df), window_seconds=window)
        page["experiments"] = [line.__dict__ for line in lines]
        page["ab_window_seconds"] = window
        return page

    def customer(self, customer_id: str) -> dict[str, Any]:
        from google.protobuf.json_format import MessageToDict

        from mercato.client import MercatoClient
        from mercato.v1 import common_pb2, profile_pb2

        prof = (
            self.profile_stub()
            .GetProfile(profile_pb2.GetProfileRequest(customer_id=customer_id), timeout=5)
            .profile
        )
        out: dict[str, Any] = {
            "profile": MessageToDict(prof, preserving_proto_field_name=True),
            "surfaces": [],
        }
        # The profile service measures recency from its wall clock; on historical data
        # the console's pages measure from the data's time: show both.
        df, clock = self.events()
        mine = df[df["customer_id"] == customer_id]
        at_data = an.segments_at(mine, clock.now + pd.Timedelta(microseconds=1))
        behind_days = (clock.wall - clock.now) / pd.Timedelta(days=1)
        out["clock"] = clock.as_json()
        out["at_clock"] = {
            "segment": str(at_data.get(customer_id, "")) or None,
            "recency_days": (
                round(prof.rfm.recency_days - behind_days, 2)
                if prof.rfm.frequency and clock.source == "data"
                else None
            ),
        }

        def answer(name: str, resp: Any) -> dict[str, Any]:
            offer = getattr(resp, "offer", None)
            return {
                "surface": name,
                "items": [
                    {
                        "rank": r.rank,
                        "item_id": r.item.item_id,
                        "title": r.item.title,
                        "category": r.item.category,
                        "price": round(r.item.price, 2),
                        "stock": r.item.stock,
                        "score": round(float(r.score), 4),
                        "reasons": [
                            common_pb2.Reason.Name(x).removeprefix("REASON_").lower()
                            for x in r.reasons
                        ],
                    }
                    for r in resp.items
                ],
                "offer": (
                    {
                        "offer_id": offer.offer_id,
                        "description": offer.description,
                        "decision_id": getattr(resp, "offer_decision_id", ""),
                    }
                    if offer is not None and offer.offer_id
                    else None
                ),
                "models": [f"{m.name} v{m.version} @{m.alias}" for m in resp.models],
                "degraded": [f"{d.stage}: {d.fallback}" for d in resp.degraded],
                "stages": [
                    {"stage": s.stage, "ms": round(s.duration_ms, 2), "items": s.item_count}
                    for s in resp.debug.stages
                ],
                "request_id": resp.request_id,
            }

        with MercatoClient(
            self.cfg.gateway, api_key=self.cfg.gateway_api_key or None, timeout=5.0, retries=0
        ) as client:
            home = client.recommend(
                customer_id, surface=common_pb2.SURFACE_HOME, k=8, include_offer=True, debug=True
            )
            out["surfaces"].append(answer("home", home))
            again = client.recommend(
                customer_id, surface=common_pb2.SURFACE_BUY_AGAIN, k=8, debug=True
            )
            out["surfaces"].append(answer("buy again", again))
            anchor = prof.recent_items[0].item_id if prof.recent_items else ""
            if anchor:
                rel = client.related_items(
                    anchor,
                    kind=common_pb2.RELATION_KIND_COMPLEMENT,
                    k=8,
                    customer_id=customer_id,
                    debug=True,
                )
                out["surfaces"].append(answer(f"product page of {anchor}", rel))
            if prof.cart.lines:
                cart = client.cart_recommendations(customer_id, k=8, debug=True)
                out["surfaces"].append(answer("cart", cart))
        return out

    def audience(self, params: dict[str, str]) -> tuple[str, bytes, int, str]:
        """The customers of a campaign segment, selected exactly as ``mercato campaign``
        selects them (its ``segment_customers``), with the console's clock as "now"."""
        from services.gateway.campaign import CampaignSpec, segment_customers

        _, clock = self.events()
        as_of_us = int(clock.now.value // 1000) if clock.source == "data" else 0
        spec = CampaignSpec(
            segment=params.get("segment", ""),
            idle_hours=float(params.get("idle_hours", 24.0)),
            max_idle_days=float(params.get("max_idle_days", 30.0)),
            lapsed_days=float(params.get("lapsed_days", 180.0)),
            category=params.get("category", ""),
            min_affinity=float(params.get("min_affinity", 0.2)),
            as_of_us=as_of_us,
            wall_us=int(clock.wall.value // 1000),
        )

        async def run() -> list[str]:
            from mercato.v1 import profile_pb2_grpc
            from services.common.channels import aio_channel
            from services.common.settings import ClientTlsSettings

            ch = aio_channel(self.cfg.profile, ClientTlsSettings())
            try:
                stub = profile_pb2_grpc.ProfileServiceStub(ch)
                return [cid async for cid in segment_customers(stub, spec)]
            finally:
                await ch.close()

        ids = asyncio.run(run())
        rows = [{"customer_id": c, "segment": spec.segment} for c in ids]
        name = f"audience-{spec.segment}-{clock.now:%Y%m%d}.csv"
        return name, csv_bytes(rows, ["customer_id", "segment"]), len(ids), clock.describe()


def build_app(cfg: ConsoleConfig) -> Starlette:
    """The ASGI application."""
    console = Console(cfg)

    def authed(
        fn: Callable[[Request], Any],
    ) -> Callable[[Request], Any]:
        async def wrapper(request: Request) -> Response:
            if console.who(request) is None:
                return JSONResponse({"error": "operator key required"}, status_code=401)
            try:
                return await fn(request)
            except FileNotFoundError as exc:
                return JSONResponse({"error": str(exc)}, status_code=503)
            except grpc.RpcError as exc:
                code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
                details = exc.details() if hasattr(exc, "details") else str(exc)
                status = 404 if code == "NOT_FOUND" else 400 if code == "INVALID_ARGUMENT" else 502
                return JSONResponse({"error": f"{code}: {details}"}, status_code=status)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)

        return wrapper

    def page(name: str, fn: Callable[[], Any], cache: bool = True) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            if cache:
                data = await run_in_threadpool(console.cached, name, fn)
            else:
                data = await run_in_threadpool(fn)
            return JSONResponse(json_safe(data))

        return authed(handler)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def login(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        name = console.check_key(str(body.get("key", "")) if isinstance(body, dict) else "")
        if name is None:
            return JSONResponse({"error": "invalid operator key"}, status_code=401)
        token = secrets.token_urlsafe(32)
        console.sessions[token] = (name, time.time() + SESSION_SECONDS)
        resp = JSONResponse({"operator": name})
        resp.set_cookie(
            COOKIE,
            token,
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=cfg.secure_cookie,
        )
        return resp

    async def logout(request: Request) -> Response:
        console.sessions.pop(request.cookies.get(COOKIE, ""), None)
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE)
        return resp

    async def me(request: Request) -> Response:
        return JSONResponse({"operator": console.who(request)})

    async def customer(request: Request) -> Response:
        cid = request.query_params.get("id", "").strip()
        if not cid:
            return JSONResponse({"error": "give a customer id"}, status_code=400)
        return JSONResponse(json_safe(await run_in_threadpool(console.customer, cid)))

    async def audience(request: Request) -> Response:
        name, body, n, clock_text = await run_in_threadpool(
            console.audience, dict(request.query_params)
        )
        return Response(
            body,
            media_type="text/csv",
            headers={
                "content-disposition": f'attachment; filename="{name}"',
                "x-audience-size": str(n),
                "x-audience-clock": clock_text,
            },
        )

    pages = {
        "runs": console.runs,
        "demand": console.demand,
        "trends": console.trends,
        "customers": console.customers,
        "offers": console.offers,
    }
    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/api/me", me),
        # live metrics: never cached (its training runs are)
        Route("/api/overview", page("overview", console.overview, cache=False)),
        Route("/api/demand", page("demand", console.demand)),
        Route("/api/trends", page("trends", console.trends)),
        Route("/api/customers", page("customers", console.customers)),
        Route("/api/offers", page("offers", console.offers)),
        Route("/api/customer", authed(customer)),
        Route("/api/export/audience.csv", authed(audience)),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]

    async def warm() -> None:
        """Compute every page once in the background, so the first visit is quick."""

        def run() -> None:
            for name, fn in pages.items():
                try:
                    console.cached(name, fn)
                except Exception as exc:  # a source may be down; the page will say so
                    log.warning("warming %s failed: %s", name, exc)

        if cfg.warm:
            threading.Thread(target=run, name="console-warm", daemon=True).start()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await warm()
        yield

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.console = console
    return app
