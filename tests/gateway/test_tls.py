"""TLS and mTLS between all services by configuration, with certificates made here:
gateway, profile and ranking as real processes; plaintext callers are refused under TLS,
callers without a client certificate under mTLS."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from mercato.client import MercatoClient, tls_credentials
from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc
from tests.certs import Pki, make_pki
from tests.procs import ServiceProc, free_port, start_service
from tests.profile.factory import event, item

pytestmark = pytest.mark.slow  # services as processes over TLS

ET = common_pb2.EventType


def server_env(name: str, pki: Pki, mtls: bool) -> dict[str, str]:
    prefix = f"MERCATO_{name.upper()}_"
    env = {
        prefix + "TLS_CERT_FILE": str(pki.server_cert),
        prefix + "TLS_KEY_FILE": str(pki.server_key),
        # how this process calls the others (the gateway's downstream channels)
        "MERCATO_CLIENT_TLS_CA_FILE": str(pki.ca),
    }
    if mtls:
        env[prefix + "TLS_CLIENT_CA_FILE"] = str(pki.ca)
        env["MERCATO_CLIENT_TLS_CERT_FILE"] = str(pki.client_cert)
        env["MERCATO_CLIENT_TLS_KEY_FILE"] = str(pki.client_key)
    return env


def start_stack(tmp_path: Path, pki: Pki, mtls: bool, ranking: bool) -> list[ServiceProc]:
    creds = tls_credentials(
        str(pki.ca),
        str(pki.client_cert) if mtls else None,
        str(pki.client_key) if mtls else None,
    )
    procs = [
        start_service("profile", tmp_path, server_env("profile", pki, mtls), credentials=creds)
    ]
    with procs[0].channel() as ch:
        stub = profile_pb2_grpc.ProfileServiceStub(ch)
        stub.UpsertItems(
            profile_pb2.UpsertItemsRequest(items=[item(f"p{k}", "kitchen") for k in range(4)]),
            timeout=10,
        )
        views = [event(f"v{k}", "bob", ET.EVENT_TYPE_VIEW, f"p{k}") for k in range(4)]
        stub.TrackEvents(profile_pb2.ProfileServiceTrackEventsRequest(events=views), timeout=10)
    ranking_target = f"127.0.0.1:{free_port()}"
    if ranking:
        procs.append(
            start_service(
                "ranking",
                tmp_path,
                server_env("ranking", pki, mtls)
                | {"MERCATO_RANKING_CATALOG_TARGET": procs[0].target},
                credentials=creds,
            )
        )
        ranking_target = procs[-1].target
    env = server_env("gateway", pki, mtls) | {
        "MERCATO_GATEWAY_PROFILE_TARGET": procs[0].target,
        "MERCATO_GATEWAY_RETRIEVAL_TARGET": f"127.0.0.1:{free_port()}",
        "MERCATO_GATEWAY_RANKING_TARGET": ranking_target,
    }
    procs.append(start_service("gateway", tmp_path, env, credentials=creds))
    return procs


def refused(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    return err.value.code()  # type: ignore[no-any-return]


def test_tls_gateway_and_profile(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    procs = start_stack(tmp_path, pki, mtls=False, ranking=False)
    gateway = procs[-1]
    try:
        with MercatoClient(gateway.target, tls_ca_file=str(pki.ca), timeout=5, retries=0) as c:
            resp = c.recommend("alice", k=3, debug=True)
        # the profile hops ran over TLS: they answered (trending items with details)
        assert {d.stage for d in resp.degraded} == {"retrieval", "ranking"}
        assert len(resp.items) == 3 and all(r.item.title for r in resp.items)
        assert resp.debug.stages[0].stage == "profile"
        assert not resp.debug.stages[0].degraded
        with MercatoClient(gateway.target, timeout=2, retries=0) as plain:
            assert refused(lambda: plain.recommend("alice", k=1)) == grpc.StatusCode.UNAVAILABLE
    finally:
        for p in reversed(procs):
            p.terminate()


def test_mtls_between_all_services(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    procs = start_stack(tmp_path, pki, mtls=True, ranking=True)
    gateway = procs[-1]
    try:
        with MercatoClient(
            gateway.target,
            tls_ca_file=str(pki.ca),
            tls_cert_file=str(pki.client_cert),
            tls_key_file=str(pki.client_key),
            timeout=5,
            retries=0,
        ) as c:
            resp = c.recommend("alice", k=3, debug=True)
        # profile and ranking both answered the gateway over mTLS
        assert {d.stage for d in resp.degraded} == {"retrieval"}
        assert len(resp.items) == 3 and all(r.item.title for r in resp.items)
        assert {s.stage for s in resp.debug.stages} >= {"profile", "ranking"}
        with MercatoClient(gateway.target, tls_ca_file=str(pki.ca), timeout=2, retries=0) as anon:
            assert refused(lambda: anon.recommend("alice", k=1)) == grpc.StatusCode.UNAVAILABLE
        # the internal services refuse a caller without a certificate too
        with grpc.secure_channel(
            procs[0].target, grpc.ssl_channel_credentials(pki.ca.read_bytes())
        ) as ch:
            stub = profile_pb2_grpc.ProfileServiceStub(ch)
            code = refused(
                lambda: stub.GetProfile(profile_pb2.GetProfileRequest(customer_id="a"), timeout=2)
            )
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        for p in reversed(procs):
            p.terminate()
