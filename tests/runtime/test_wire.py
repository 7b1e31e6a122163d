"""Wire-format helpers (services/common/wire.py) and the gateway's requests assembled
from the profile's bytes: they parse to exactly the request built with the profile."""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2

from mercato.v1 import common_pb2, profile_pb2, ranking_pb2, retrieval_pb2
from services.common.wire import (
    WireError,
    field_payload,
    field_tag,
    length_delimited,
    varint,
)
from services.gateway.pipeline import Pipeline, Trace


def _profile(n: int = 30) -> common_pb2.Profile:
    p = common_pb2.Profile(customer_id="c-1", known=True, country="UK", segment="loyal")
    for i in range(n):
        p.recent_items.add(
            item_id=f"SKU-{i}", type=2, timestamp=timestamp_pb2.Timestamp(seconds=10**9 + i)
        )
        p.purchases.add(item_id=f"SKU-{i}", count=i + 1, quantity=2)
    p.cart.lines.add(item_id="SKU-1", quantity=3)
    p.category_affinity.update({"kitchen": 0.7, "garden": 0.3})
    p.rfm.monetary = 123.5
    return p


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16_383, 16_384, 2**35])
def test_varint_matches_protobuf(n: int) -> None:
    # Timestamp.seconds is field 1, an int64: tag 0x08, then the varint (0 is not sent).
    encoded = timestamp_pb2.Timestamp(seconds=n).SerializeToString()
    assert encoded == (b"\x08" + varint(n) if n else b"")


def test_field_payload_finds_the_field_among_others() -> None:
    p = _profile()
    raw = profile_pb2.GetProfileResponse(profile=p).SerializeToString()
    assert common_pb2.Profile.FromString(field_payload(raw, 1) or b"") == p
    # Among varint, fixed and other length-delimited fields, in any order.
    req = retrieval_pb2.RetrieveRequest(
        k=200,
        model_alias="champion",
        filters=retrieval_pb2.Filters(exclude_item_ids=["a", "b"], in_stock_only=True),
        context=common_pb2.Context(surface=common_pb2.SURFACE_CART, cart_item_ids=["x"]),
    )
    raw = req.SerializeToString() + length_delimited(
        field_tag(retrieval_pb2.RetrieveRequest.DESCRIPTOR, "profile"), p.SerializeToString()
    )
    number = retrieval_pb2.RetrieveRequest.DESCRIPTOR.fields_by_name["profile"].number
    assert common_pb2.Profile.FromString(field_payload(raw, number) or b"") == p
    ctx_number = retrieval_pb2.RetrieveRequest.DESCRIPTOR.fields_by_name["context"].number
    assert field_payload(raw, ctx_number) == req.context.SerializeToString()
    assert field_payload(req.SerializeToString(), number) is None


def test_field_payload_merges_repeated_occurrences_like_protobuf() -> None:
    a = common_pb2.Profile(customer_id="c", segment="new").SerializeToString()
    b = common_pb2.Profile(country="UK").SerializeToString()
    tag = field_tag(profile_pb2.GetProfileResponse.DESCRIPTOR, "profile")
    raw = length_delimited(tag, a) + length_delimited(tag, b)
    want = profile_pb2.GetProfileResponse.FromString(raw).profile
    assert common_pb2.Profile.FromString(field_payload(raw, 1) or b"") == want


@pytest.mark.parametrize("bad", [b"\x0a\x05abc", b"\x0a", b"\x80", b"\x0b", b"\x08\xff"])
def test_malformed_bytes_raise_wire_error(bad: bytes) -> None:
    with pytest.raises(WireError):
        field_payload(bad, 1)


@pytest.mark.parametrize(
    "request_type",
    [
        retrieval_pb2.RetrieveRequest,
        retrieval_pb2.RetrieveRelatedRequest,
        ranking_pb2.RankRequest,
        ranking_pb2.SelectOfferRequest,
    ],
)
def test_requests_with_the_profile_bytes_equal_requests_built_with_the_profile(
    request_type: type,
) -> None:
    """What the gateway sends: the request without a profile, serialized, plus the
    profile's bytes as received. Parsed, it is the request built with the profile; a
    profile serialized on demand (fallbacks) gives the same, serialized once."""
    p = _profile()
    ctx = common_pb2.Context(surface=common_pb2.SURFACE_HOME, anchor_item_id="SKU-3")
    trace = Trace(debug=False)
    trace.profile, trace.profile_bytes = p, p.SerializeToString()
    known = request_type.DESCRIPTOR.fields_by_name
    fields = {k: v for k, v in (("model_alias", "challenger"), ("context", ctx)) if k in known}
    head = request_type(**fields)
    sent = Pipeline._with_profile(head, p, trace)
    assert request_type.FromString(sent) == request_type(profile=p, **fields)
    # Another profile object (the anonymous fallback): serialized, then reused.
    anon = common_pb2.Profile(customer_id="c-2", known=False)
    sent = Pipeline._with_profile(head, anon, trace)
    got = request_type.FromString(sent)
    assert got == request_type(profile=anon, **fields) and got.HasField("profile")
    assert trace.profile is anon and trace.profile_bytes == anon.SerializeToString()
