"""`mercato campaign` through real processes: profile, ranking (offer policy with a tiny
budget) and the gateway; segments from the profile service, answers from the gateway."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mercato.cli import app
from mercato.client import MercatoClient
from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from tests.procs import free_port, start_service
from tests.profile.factory import DAY_US, NOW_US, event, item

pytestmark = pytest.mark.slow  # profile, ranking and gateway as processes

ET = common_pb2.EventType

OFFERS = """
margin_rate: 0.35
default_order_value: 40.0
attribution_days: 7
exploration: {max_share: 1.0, prior_lift_sd: 3.0}
offers:
  - {id: none, kind: none, description: No incentive}
  - id: reminder
    kind: cart_recovery
    description: Your cart misses you
    cost: {fixed: 0.01}
    eligibility: {surfaces: [email], min_idle_minutes: 60, min_cart_value: 1}
    budget: {amount: 0.02, period: total}
"""


def test_campaigns_through_the_gateway(tmp_path: Path) -> None:
    profile = start_service("profile", tmp_path)
    offers = tmp_path / "offers.yaml"
    offers.write_text(OFFERS)
    ranking = start_service(
        "ranking",
        tmp_path,
        {
            "MERCATO_RANKING_OFFERS_FILE": str(offers),
            "MERCATO_RANKING_CATALOG_TARGET": profile.target,
        },
    )
    gateway = start_service(
        "gateway",
        tmp_path,
        {
            "MERCATO_GATEWAY_PROFILE_TARGET": profile.target,
            "MERCATO_GATEWAY_RETRIEVAL_TARGET": f"127.0.0.1:{free_port()}",
            "MERCATO_GATEWAY_RANKING_TARGET": ranking.target,
        },
    )
    try:
        old = NOW_US - 2 * DAY_US
        evs = []
        for k in range(8):  # popularity for the trending fallback
            evs += [
                event(f"v{k}-{j}", f"seed{j}", ET.EVENT_TYPE_VIEW, f"i{k}", old)
                for j in range(8 - k)
            ]
        carts = [f"cart{i}" for i in range(16)]
        evs += [event(f"a-{c}", c, ET.EVENT_TYPE_ADD_TO_CART, "i1", old) for c in carts]
        evs.append(event("a-fresh", "fresh", ET.EVENT_TYPE_ADD_TO_CART, "i1", NOW_US))
        evs.append(event("a-paid", "paid", ET.EVENT_TYPE_ADD_TO_CART, "i1", old))
        evs.append(event("p-paid", "paid", ET.EVENT_TYPE_PURCHASE, "i1", old + 10**6))
        lapsed = ["l1", "l2", "l3"]
        evs += [
            event(f"p-{c}", c, ET.EVENT_TYPE_PURCHASE, "i2", NOW_US - 400 * DAY_US) for c in lapsed
        ]
        fans = ["g1", "g2"]
        evs += [event(f"f-{c}", c, ET.EVENT_TYPE_VIEW, "i0", old) for c in fans]  # garden
        with profile.channel() as ch:
            stub = profile_pb2_grpc.ProfileServiceStub(ch)
            stub.UpsertItems(
                profile_pb2.UpsertItemsRequest(
                    items=[
                        item(f"i{k}", "garden" if k % 2 == 0 else "kitchen", 10.0 + k, stock=9)
                        for k in range(8)
                    ]
                ),
                timeout=10,
            )
            stub.TrackEvents(profile_pb2.ProfileServiceTrackEventsRequest(events=evs), timeout=10)

        runner = CliRunner()
        common = ["--gateway", gateway.target, "--profile", profile.target, "--no-progress"]
        out = tmp_path / "carts.parquet"
        res = runner.invoke(
            app,
            ["campaign", "--segment", "abandoned-carts", "--out", str(out), "--k", "3",
             "--concurrency", "4", *common],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        rows = pq.read_table(out).to_pylist()
        assert {r["customer_id"] for r in rows} == set(carts)  # not fresh, not paid
        assert all(r["item_id"] != "i1" for r in rows)  # what is in the cart is excluded
        given = {r["customer_id"] for r in rows if r["offer_id"] == "reminder"}
        decided = {r["customer_id"] for r in rows if r["offer_decision_id"]}
        assert decided == set(carts)  # every customer's offer came from the policy
        with ranking.channel() as ch:
            status = {
                o.offer.offer_id: o
                for o in ranking_pb2_grpc.RankingServiceStub(ch)
                .ListOffers(ranking_pb2.ListOffersRequest(), timeout=5)
                .offers
            }
        # the budget (0.02 at a fixed 0.01 per reminder) was used and then held across the
        # whole batch: exactly two reminders. (The broad prior makes each of the 16
        # eligible customers a coin flip for the reminder while budget is left: fewer
        # than two happens with probability 17 / 2**16.)
        assert len(given) == 2, rows
        assert status["reminder"].decisions == len(given)
        assert status["reminder"].spent <= 0.02 + 1e-9

        # an outcome sent to the gateway's TrackEvents reaches the offer policy
        row = next(r for r in rows if r["offer_decision_id"])
        bought = event(
            "buy-after-email",
            row["customer_id"],
            ET.EVENT_TYPE_PURCHASE,
            "i3",
            NOW_US,
            attributes={"decision_id": row["offer_decision_id"]},
        )
        with MercatoClient(gateway.target, timeout=5) as client:
            assert client.track_events([bought]).accepted == 1
        with ranking.channel() as ch:
            again = ranking_pb2_grpc.RankingServiceStub(ch).RecordOfferOutcome(
                ranking_pb2.RecordOfferOutcomeRequest(
                    decision_id=row["offer_decision_id"],
                    outcome=ranking_pb2.OFFER_OUTCOME_CONVERTED_WITHOUT_OFFER,
                ),
                timeout=5,
            )
        assert not again.recorded  # the gateway had forwarded it already

        out = tmp_path / "lapsed.csv"
        res = runner.invoke(
            app,
            ["campaign", "--segment", "lapsed", "--lapsed-days", "365", "--out", str(out),
             "--k", "2", *common],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        with open(out) as f:
            lrows = list(csv.DictReader(f))
        assert {r["customer_id"] for r in lrows} == set(lapsed)
        assert all(r["item_id"] != "i2" for r in lrows)  # already bought
        assert all(r["rank"] in ("1", "2") for r in lrows)

        out = tmp_path / "fans.csv"
        res = runner.invoke(
            app,
            ["campaign", "--segment", "category-fans", "--category", "garden",
             "--min-affinity", "0.5", "--out", str(out), "--k", "3", *common],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        with open(out) as f:
            frows = list(csv.DictReader(f))
        # g1, g2 and the seed viewers whose interest is mostly garden
        assert set(fans) <= {r["customer_id"] for r in frows}
        assert "cart0" not in {r["customer_id"] for r in frows}  # kitchen only
        assert {r["category"] for r in frows} == {"garden"}

        res = runner.invoke(app, ["campaign", "--segment", "category-fans", "--out", "x.csv"])
        assert res.exit_code != 0 and "category" in res.output
    finally:
        for p in (gateway, ranking, profile):
            p.terminate()
