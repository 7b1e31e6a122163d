"""Promises of common.proto and profile.proto that no other test checked: required ids,
the 128-byte id limit and non-negative catalog numbers, on a real profile service."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc
from tests.procs import ServiceProc, start_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    proc = start_service("profile", tmp_path_factory.mktemp("promises"))
    yield proc
    proc.terminate()


def _item(**kw: object) -> common_pb2.Item:
    return common_pb2.Item(**{"item_id": "sku-1", "title": "t", "price": 1.0, "stock": 1, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_of", "needle"),
    [
        (lambda: profile_pb2.UpsertItemsRequest(items=[_item(item_id="")]), "item_id"),
        (lambda: profile_pb2.UpsertItemsRequest(items=[_item(item_id="x" * 129)]), "128"),
        (lambda: profile_pb2.UpsertItemsRequest(items=[_item(price=-1.0)]), "price"),
        (lambda: profile_pb2.UpsertItemsRequest(items=[_item(stock=-1)]), "stock"),
    ],
    ids=["item-id-missing", "item-id-129-bytes", "price-negative", "stock-negative"],
)
def test_catalog_items_are_checked(profile: ServiceProc, request_of: object, needle: str) -> None:
    """common.proto Item: item_id required, at most 128 bytes; price and stock >= 0."""
    with profile.channel() as ch:
        stub = profile_pb2_grpc.ProfileServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.UpsertItems(request_of(), timeout=5)  # type: ignore[operator]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in (err.value.details() or ""), err.value.details()
        # nothing was written, and the service keeps answering
        got = stub.GetItems(profile_pb2.GetItemsRequest(item_ids=["sku-1"]), timeout=5)
        assert list(got.missing_item_ids) == ["sku-1"]


def test_customer_ids_are_required(profile: ServiceProc) -> None:
    """profile.proto GetCartRequest.customer_id and Customer.customer_id: required."""
    with profile.channel() as ch:
        stub = profile_pb2_grpc.ProfileServiceStub(ch)
        for call in (
            lambda: stub.GetCart(profile_pb2.GetCartRequest(), timeout=5),
            lambda: stub.UpsertCustomers(
                profile_pb2.UpsertCustomersRequest(customers=[profile_pb2.Customer()]), timeout=5
            ),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "customer_id" in (err.value.details() or ""), err.value.details()
