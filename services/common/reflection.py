"""Server reflection under both names clients ask for: ``grpc.reflection.v1`` (grpcurl,
grpc-js and grpc-java tools today) and ``grpc.reflection.v1alpha`` (older tools).

grpcio-reflection ships only the v1alpha messages. The v1 protocol is the same file with
the package renamed (identical messages and field numbers), so the one servicer answers
both: the v1 method is registered with the v1alpha (de)serializers, and a v1 copy of the
descriptor is added to the pool so that v1 itself can be described.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1ALPHA_PACKAGE = reflection_pb2.DESCRIPTOR.package
_V1_PACKAGE = "grpc.reflection.v1"


def _rename(type_name: str) -> str:
    return type_name.replace(f".{_V1ALPHA_PACKAGE}.", f".{_V1_PACKAGE}.")


def _rename_message(msg: descriptor_pb2.DescriptorProto) -> None:
    for f in msg.field:
        if f.type_name:
            f.type_name = _rename(f.type_name)
    for nested in msg.nested_type:
        _rename_message(nested)


def add_v1_descriptor(pool: descriptor_pool.DescriptorPool | None = None) -> None:
    """Add ``grpc/reflection/v1/reflection.proto`` to ``pool`` (once)."""
    pool = pool or descriptor_pool.Default()
    try:
        pool.FindServiceByName(V1_SERVICE_NAME)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "grpc/reflection/v1/reflection.proto"
    fdp.package = _V1_PACKAGE
    fdp.ClearField("options")
    for msg in fdp.message_type:
        _rename_message(msg)
    for svc in fdp.service:
        for m in svc.method:
            m.input_type = _rename(m.input_type)
            m.output_type = _rename(m.output_type)
    pool.Add(fdp)


def enable_reflection(
    service_names: Iterable[str], server: grpc.aio.Server | grpc.Server, sync: bool = False
) -> None:
    """Serve reflection for ``service_names`` (plus both reflection services) on ``server``
    (``sync``: a synchronous ``grpc.server``)."""
    add_v1_descriptor()
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    servicer = (
        reflection.ReflectionServicer(names) if sync else reflection.aio.ReflectionServicer(names)
    )
    for service in (V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME):
        handlers = {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
