"""A small typed client for the Mercato gateway.

    from mercato.client import MercatoClient
    from mercato.v1 import common_pb2

    with MercatoClient("127.0.0.1:50051", api_key="...") as client:
        resp = client.recommend("customer-42", surface=common_pb2.SURFACE_HOME, k=10)
        for item in resp.items:
            print(item.rank, item.item.item_id, item.item.title, item.reasons)

Every call has a deadline (``timeout``). Every gateway call is idempotent (reads, and
event tracking de-duplicated by event id), so the channel retries UNAVAILABLE with
exponential backoff through gRPC's own retry policy, at most ``retries`` extra attempts.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from types import TracebackType

import grpc

from mercato.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

__all__ = ["MercatoClient", "new_event_id", "tls_credentials"]

_SERVICE = "mercato.v1.GatewayService"


def _service_config(retries: int) -> str:
    policy = {
        "methodConfig": [
            {
                "name": [{"service": _SERVICE}],
                "retryPolicy": {
                    "maxAttempts": max(2, retries + 1),
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    if retries <= 0:
        policy["methodConfig"][0].pop("retryPolicy")
    return json.dumps(policy)


def tls_credentials(
    ca_file: str, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files: the CA to trust, and optionally a client
    certificate and its key (mTLS)."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both cert_file and key_file")
    with open(ca_file, "rb") as f:
        ca = f.read()
    cert = key = None
    if cert_file and key_file:
        with open(cert_file, "rb") as f:
            cert = f.read()
        with open(key_file, "rb") as f:
            key = f.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def new_event_id() -> str:
    """A fresh unique event id."""
    return uuid.uuid4().hex


class MercatoClient:
    """Synchronous client of ``mercato.v1.GatewayService``."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        timeout: float = 2.0,
        retries: int = 2,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        """``tls_ca_file`` turns TLS on (the CA the gateway's certificate chains to);
        ``tls_cert_file`` + ``tls_key_file`` present a client certificate (mTLS);
        ``tls_server_name`` checks the certificate against another name than the
        target's host. ``credentials`` gives ready-made channel credentials instead."""
        if credentials is None and tls_ca_file:
            credentials = tls_credentials(tls_ca_file, tls_cert_file, tls_key_file)
        elif credentials is None and (tls_cert_file or tls_key_file):
            raise ValueError("tls_cert_file / tls_key_file need tls_ca_file")
        options: list[tuple[str, object]] = [
            ("grpc.enable_retries", 1 if retries > 0 else 0),
            ("grpc.service_config", _service_config(retries)),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self.timeout = timeout
        self.api_key = api_key

    def _metadata(self, request_id: str | None) -> list[tuple[str, str]]:
        md: list[tuple[str, str]] = []
        if self.api_key:
            md.append(("x-api-key", self.api_key))
        if request_id:
            md.append(("x-request-id", request_id))
        return md

    def recommend(
        self,
        customer_id: str,
        *,
        surface: common_pb2.Surface.ValueType = common_pb2.SURFACE_HOME,
        k: int = 10,
        context: common_pb2.Context | None = None,
        include_offer: bool = False,
        debug: bool = False,
        categories: Sequence[str] = (),
        exclude_item_ids: Sequence[str] = (),
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> gateway_pb2.RecommendResponse:
        """Ranked items for a customer on a surface."""
        ctx = common_pb2.Context()
        if context is not None:
            ctx.CopyFrom(context)
        if not ctx.surface:
            ctx.surface = surface
        req = gateway_pb2.RecommendRequest(
            customer_id=customer_id,
            context=ctx,
            k=k,
            include_offer=include_offer,
            debug=debug,
            categories=list(categories),
            exclude_item_ids=list(exclude_item_ids),
        )
        return self._stub.Recommend(
            req, timeout=timeout or self.timeout, metadata=self._metadata(request_id)
        )

    def related_items(
        self,
        item_id: str,
        *,
        kind: common_pb2.RelationKind.ValueType = common_pb2.RELATION_KIND_SIMILAR,
        k: int = 10,
        customer_id: str = "",
        debug: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> gateway_pb2.GetRelatedItemsResponse:
        """Similar items, complements or up-sell alternatives of a product."""
        req = gateway_pb2.GetRelatedItemsRequest(
            item_id=item_id, kind=kind, k=k, customer_id=customer_id, debug=debug
        )
        return self._stub.GetRelatedItems(
            req, timeout=timeout or self.timeout, metadata=self._metadata(request_id)
        )

    def cart_recommendations(
        self,
        customer_id: str,
        *,
        k: int = 10,
        include_offer: bool = True,
        context: common_pb2.Context | None = None,
        debug: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> gateway_pb2.GetCartRecommendationsResponse:
        """Items that go with the customer's cart, and a cart offer."""
        req = gateway_pb2.GetCartRecommendationsRequest(
            customer_id=customer_id, k=k, include_offer=include_offer, debug=debug
        )
        if context is not None:
            req.context.CopyFrom(context)
        return self._stub.GetCartRecommendations(
            req, timeout=timeout or self.timeout, metadata=self._metadata(request_id)
        )

    def track_events(
        self,
        events: Iterable[common_pb2.Event],
        *,
        partial_accept: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> gateway_pb2.TrackEventsResponse:
        """Record events; safe to retry (de-duplicated by event id)."""
        req = gateway_pb2.TrackEventsRequest(events=list(events), partial_accept=partial_accept)
        return self._stub.TrackEvents(
            req, timeout=timeout or self.timeout, metadata=self._metadata(request_id)
        )

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> MercatoClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
