"""Shoppers through the public gateway API, so that exposures, offers, clicks, purchases
and redemptions exist in the event log (the console's offers and experiments pages read
them). Every call is a real gRPC call; outcomes are drawn with a fixed seed."""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass

from mercato.client import MercatoClient
from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc

ET = common_pb2.EventType

#: A/A experiment on the ranker: both arms serve the champion (the demo registers no
#: different challenger), which the report must find indistinguishable.
EXPERIMENTS = """
experiments:
  - name: ranker-aa
    model: mercato-ranker
    enabled: true
    variants:
      - {name: control, alias: champion, weight: 50}
      - {name: twin, alias: champion, weight: 50}
"""


@dataclass
class Traffic:
    calls: int = 0
    events: int = 0
    offers: int = 0
    redeemed: int = 0


def cart_customers(profile_target: str, limit: int) -> list[str]:
    with profile_pb2_grpc_channel(profile_target) as stub:
        resp = stub.ListAbandonedCarts(
            profile_pb2.ListAbandonedCartsRequest(idle_seconds=1, page_size=limit), timeout=30
        )
    return [c.customer_id for c in resp.carts if c.lines]


class profile_pb2_grpc_channel:
    def __init__(self, target: str) -> None:
        import grpc

        self.channel = grpc.insecure_channel(target)

    def __enter__(self) -> profile_pb2_grpc.ProfileServiceStub:
        return profile_pb2_grpc.ProfileServiceStub(self.channel)

    def __exit__(self, *exc: object) -> None:
        self.channel.close()


def _event(cid: str, kind: int, item: str = "", **kw: object) -> common_pb2.Event:
    ev = common_pb2.Event(event_id=f"sim-{uuid.uuid4().hex}", customer_id=cid, type=kind)  # type: ignore[arg-type]
    if item:
        ev.item_id = item
    for k, v in kw.items():
        if k == "attributes":
            ev.attributes.update(v)  # type: ignore[arg-type]
        else:
            setattr(ev, k, v)
    ev.timestamp.FromNanoseconds(time.time_ns())
    return ev


def shop(gateway: str, customers: list[str], seed: int = 0) -> Traffic:
    """Each customer gets cart recommendations with an offer (or a home feed), then maybe
    clicks, buys and redeems the offer, all sent through the gateway's TrackEvents."""
    rng = random.Random(seed)
    out = Traffic()
    with MercatoClient(gateway, timeout=10.0, retries=0) as client:
        for cid in customers:
            resp = client.cart_recommendations(cid, k=5, include_offer=True)
            out.calls += 1
            events = []
            offer = resp.offer.offer_id if resp.offer.offer_id != "none" else ""
            out.offers += bool(offer)
            items = list(resp.items)
            if items and rng.random() < 0.6:
                events.append(
                    _event(
                        cid, ET.EVENT_TYPE_CLICK, items[0].item.item_id, request_id=resp.request_id
                    )
                )
            if rng.random() < (0.55 if offer else 0.35):
                value = resp.cart.value or (items[0].item.price if items else 20.0)
                for line in resp.cart.lines:
                    events.append(
                        _event(
                            cid,
                            ET.EVENT_TYPE_PURCHASE,
                            line.item_id,
                            quantity=max(1, line.quantity),
                            price=line.price,
                            order_id=f"sim-{cid}",
                        )
                    )
                if offer:
                    out.redeemed += 1
                    events.append(
                        _event(
                            cid,
                            ET.EVENT_TYPE_OFFER_REDEEMED,
                            offer_id=offer,
                            price=value,
                            quantity=1,
                            attributes={"decision_id": resp.offer_decision_id},
                        )
                    )
            if events:
                client.track_events(events)
                out.events += len(events)
    return out
