"""Exposures written by a real gateway into a real profile service's event log, flushed
when the gateway drains on SIGTERM, and the A/B report computed from them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mercato.client import MercatoClient
from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc
from services.gateway.experiments import load_experiments
from tests.procs import free_port, start_service
from tests.profile.factory import NOW_US, event, item

pytestmark = pytest.mark.slow  # gateway and profile as processes

ET = common_pb2.EventType


def test_exposures_logged_flushed_on_drain_and_reported(tmp_path: Path) -> None:
    profile = start_service("profile", tmp_path)
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(
        "experiments:\n"
        "  - name: tt\n"
        "    stage: retrieval\n"
        "    variants:\n"
        "      - {name: control, alias: champion, weight: 50}\n"
        "      - {name: challenger, alias: challenger, weight: 50}\n"
    )
    exp = load_experiments(experiments)[0]
    dead = f"127.0.0.1:{free_port()}"
    try:
        with profile.channel() as ch:
            stub = profile_pb2_grpc.ProfileServiceStub(ch)
            stub.UpsertItems(
                profile_pb2.UpsertItemsRequest(
                    items=[item(f"p{k}", "kitchen", 5.0 + k) for k in range(6)]
                ),
                timeout=10,
            )
            stub.TrackEvents(
                profile_pb2.ProfileServiceTrackEventsRequest(
                    events=[
                        event(f"v{k}-{j}", f"seed{j}", ET.EVENT_TYPE_VIEW, f"p{k}", NOW_US - 10**7)
                        for k in range(6)
                        for j in range(6 - k)
                    ]
                ),
                timeout=10,
            )
        gateway = start_service(
            "gateway",
            tmp_path,
            {
                "MERCATO_GATEWAY_PROFILE_TARGET": profile.target,
                "MERCATO_GATEWAY_RETRIEVAL_TARGET": dead,
                "MERCATO_GATEWAY_RANKING_TARGET": dead,
                "MERCATO_GATEWAY_EXPERIMENTS_FILE": str(experiments),
                # a long flush interval: only the drain at SIGTERM sends the last batch
                "MERCATO_GATEWAY_EXPOSURE_FLUSH_MS": "5000",
            },
        )
        customers = [f"c{i}" for i in range(12)]
        shown: dict[str, tuple[str, list[str]]] = {}
        with MercatoClient(gateway.target, timeout=5) as c:
            for cid in customers:
                resp = c.recommend(cid, k=3)
                shown[cid] = (resp.request_id, [r.item.item_id for r in resp.items])
                assert [(a.experiment, a.variant) for a in resp.experiments] == [
                    ("tt", exp.assign(cid).name)
                ]
            c.related_items("p1", k=2, customer_id="c0")
            c.recommend("", k=2)  # anonymous: not logged
        assert gateway.terminate() == 0  # drains: the queued exposures are sent now

        log = tmp_path / "events.parquet"
        runner = CliRunner()
        from mercato.cli import app

        sqlite = str(tmp_path / "home" / "profile" / "profile.db")
        res = runner.invoke(
            app, ["export-events", "--out", str(log), "--no-progress", "--sqlite-path", sqlite]
        )
        assert res.exit_code == 0, res.output
        from services.profile.export import read_events_frame

        df = read_events_frame(log)
        exposures = df[df.event_type == "exposure"]
        assert len(exposures) == len(customers) + 1  # 12 Recommend + 1 related
        rec = exposures[exposures.request_id == shown["c3"][0]].iloc[0]
        attrs = json.loads(rec.attributes)
        assert json.loads(attrs["items"]) == shown["c3"][1]  # order = positions shown
        assert attrs["call"] == "recommend" and rec.surface == "home"
        assert (rec.experiment, rec.variant) == ("tt", exp.assign("c3").name)
        assert "retrieval" in attrs["degraded"]
        related = exposures[exposures.surface == "product"].iloc[0]
        assert json.loads(related.attributes)["anchor_item_id"] == "p1"

        # exposures change no profile: a customer only shown items is still unknown
        with profile.channel() as ch:
            stub = profile_pb2_grpc.ProfileServiceStub(ch)
            prof = stub.GetProfile(profile_pb2.GetProfileRequest(customer_id="c5"), timeout=5)
            assert not prof.profile.known
            # outcomes: c0..c3 click, c0 and c1 buy (after their exposures)
            # (now, not the module's NOW_US: in a long test session that lies before the
            # exposures, which the gateway stamps with the real time)
            later = time.time_ns() // 1000 + 60 * 10**6
            outcomes = [event(f"k{i}", f"c{i}", ET.EVENT_TYPE_CLICK, "p2", later) for i in range(4)]
            outcomes += [
                event(f"b{i}", f"c{i}", ET.EVENT_TYPE_PURCHASE, "p2", later, price=4.0)
                for i in range(2)
            ]
            stub.TrackEvents(
                profile_pb2.ProfileServiceTrackEventsRequest(events=outcomes), timeout=10
            )
        export = tmp_path / "exported.parquet"
        res = runner.invoke(
            app, ["export-events", "--sqlite-path", sqlite, "--out", str(export), "--no-progress"]
        )
        assert res.exit_code == 0, res.output
        res = runner.invoke(
            app,
            ["report", "ab", "--events", str(export), "--window", "3600", "--format", "json"],
        )
        assert res.exit_code == 0, res.output
        lines = {d["variant"]: d for d in json.loads(res.output)}
        for variant in ("control", "challenger"):
            members = [cid for cid in customers if exp.assign(cid).name == variant]
            want_exposures = len(members) + (1 if "c0" in members else 0)
            line = lines[variant]
            assert line["exposures"] == want_exposures
            assert line["customers"] == len(members)
            clicked = [cid for cid in members if cid in {"c0", "c1", "c2", "c3"}]
            bought = [cid for cid in members if cid in {"c0", "c1"}]
            assert line["clicks"] == len(clicked)
            assert line["conversions"] == len(bought)
            assert line["revenue"] == 4.0 * len(bought)
    finally:
        profile.terminate()


def test_exposure_queue_is_bounded_and_drops_are_counted() -> None:
    import asyncio

    import grpc

    from services.gateway.exposures import EXPOSURES_DROPPED, ExposureLog, exposure_event

    def dropped(reason: str) -> float:
        return EXPOSURES_DROPPED.labels(reason)._value.get()  # type: ignore[no-any-return]

    async def run() -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")  # nobody listens
        xlog = ExposureLog(channel, max_queue=2, batch_size=10, flush_interval=0.01, timeout=0.2)
        full, failed = dropped("queue_full"), dropped("send_failed")
        for i in range(5):  # the request path never waits: 2 queued, 3 dropped
            xlog.log(
                exposure_event(
                    customer_id=f"c{i}", request_id="r", surface=1, call="recommend", item_ids=[]
                )
            )
        assert dropped("queue_full") - full == 3
        await xlog.close(timeout=3)
        assert dropped("send_failed") - failed == 2  # the profile service is unreachable
        await channel.close()

    asyncio.run(run())
