"""Client channels between services: message limits, keepalive, TLS/mTLS by settings, and
per-call load balancing.

Every channel uses the ``round_robin`` load-balancing policy: it connects to every address
its target resolves to and spreads calls over them one by one. In Kubernetes the targets
are ``dns:///<headless Service>:<port>``, which resolve to one address per ready pod, so
each gateway spreads its calls over all replicas instead of pinning one connection to one
pod (what a ClusterIP Service with the default ``pick_first`` gives). The servers' max
connection age (services/common/server.py) closes connections now and then; the client
then re-resolves the name and picks up replicas added since. Locally a target may list
several addresses: ``ipv4:127.0.0.1:7001,127.0.0.1:7002``.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc

from services.common.settings import ClientTlsSettings

SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_options(max_message_bytes: int = 4 * 1024 * 1024) -> list[tuple[str, object]]:
    """Options of every internal channel."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.enable_retries", 0),  # retries are explicit, per call, where idempotent
        ("grpc.service_config", SERVICE_CONFIG),
        # Re-resolve at most this often (on connection loss, e.g. after max connection age).
        ("grpc.dns_min_time_between_resolutions_ms", 5_000),
    ]


def client_credentials(tls: ClientTlsSettings | None) -> grpc.ChannelCredentials | None:
    """TLS channel credentials, or None for plaintext."""
    if tls is None or not tls.ca_file:
        return None
    ca = Path(tls.ca_file).read_bytes()
    key = Path(tls.key_file).read_bytes() if tls.key_file else None
    cert = Path(tls.cert_file).read_bytes() if tls.cert_file else None
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def aio_channel(
    target: str,
    tls: ClientTlsSettings | None = None,
    max_message_bytes: int = 4 * 1024 * 1024,
) -> grpc.aio.Channel:
    """An asyncio channel to another Mercato service."""
    options = channel_options(max_message_bytes)
    creds = client_credentials(tls)
    if tls is not None and tls.server_name_override:
        options.append(("grpc.ssl_target_name_override", tls.server_name_override))
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, creds, options=options)
