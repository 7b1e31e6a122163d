"""The server interceptor every service runs: request ids, auth hook, structured access
logs, Prometheus metrics and mapping of exceptions to gRPC status codes.

One interceptor does all of it, so each call pays for one wrapper, and the order is
fixed: request id first (so every log line and error carries it), then authentication,
then the request check, then the handler, then metrics and the access log.

The request id goes back to the caller three ways: in the initial metadata, in the
trailing metadata (also on errors, where there is no response and often no initial
metadata), and in the response's ``request_id`` field where the message has one.

A request whose bytes do not parse as the method's request message is answered
INVALID_ARGUMENT (grpcio itself would answer with a bare INTERNAL or UNKNOWN status):
the deserializer is wrapped so a parse failure reaches the call wrapper as a value.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc

from services.common.errors import InvalidArgument, ServiceError
from services.common.logs import request_id_var
from services.common.metrics import RPC_IN_FLIGHT, RPC_LATENCY, RPC_REQUESTS

log = logging.getLogger("mercato.access")

REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID = 128

# Methods that never need authentication and are not access-logged at INFO.
INFRA_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# An authenticator gets the full method name and the invocation metadata and raises a
# ServiceError (Unauthenticated, ResourceExhausted, ...) to refuse the call. It may
# return a principal name, logged with the call.
Authenticator = Callable[[str, Sequence[tuple[str, Any]]], str | None]


def _metadata_value(metadata: Sequence[tuple[str, Any]] | None, key: str) -> str:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return ""


class _Undecodable:
    """What the wrapped deserializer returns for request bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe_deserializer(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or anything the message's parser raises
            return _Undecodable(str(exc) or type(exc).__name__)

    return parse


def new_request_id() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


def _clean_request_id(raw: str) -> str:
    raw = raw.strip()
    if not raw or len(raw) > _MAX_REQUEST_ID or not raw.isprintable():
        return new_request_id()
    return raw


class _Runtime:
    """What the asyncio and the synchronous interceptors share: request ids, auth, the
    request check, metrics and the access log."""

    def __init__(self, service: str, authenticator: Authenticator | None = None) -> None:
        self.service = service
        self.authenticator = authenticator
        self.in_flight = RPC_IN_FLIGHT.labels(service)
        # One wrapped handler per method, built on its first call and reused (the
        # registered handler of a method never changes); the call's metadata is read
        # from its context.
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        # Prometheus children per (method, code): a labels() lookup per call costs more
        # than the increment.
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    # The call wrappers of each server kind (asyncio or synchronous).
    _wrap_unary: Callable[..., Any]
    _wrap_stream: Callable[..., Any]

    def _wrapped(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """``handler`` inside the runtime, built once per method and kept."""
        infra = method.startswith(INFRA_PREFIXES)
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, infra),
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, infra),
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        else:
            return handler  # client-streaming calls are not part of the Mercato API
        self._handlers[method] = wrapped
        return wrapped

    def _request_id(self, metadata: Sequence[tuple[str, Any]], context: Any) -> str:
        """The call's request id, set for logs and outgoing calls and put in the trailing
        metadata, which reaches the caller on success and on error alike."""
        rid = _clean_request_id(_metadata_value(metadata, REQUEST_ID_KEY))
        request_id_var.set(rid)
        context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
        return rid

    def _begin(
        self, method: str, metadata: Sequence[tuple[str, Any]], infra: bool, request: Any
    ) -> str | None:
        """Authenticate, then refuse a request that did not parse; the principal."""
        principal = None
        if self.authenticator is not None and not infra:
            principal = self.authenticator(method, metadata)
        if isinstance(request, _Undecodable):
            raise InvalidArgument(
                f"the request bytes do not parse as the request message of {method}: "
                f"{request.error}"
            )
        return principal

    def _failure(self, exc: BaseException, rid: str, method: str) -> tuple[grpc.StatusCode, str]:
        """The status an exception from a handler is answered with (unexpected ones are
        logged with their traceback)."""
        if isinstance(exc, ServiceError):
            return exc.code, exc.message
        if isinstance(exc, NotImplementedError):
            return grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet"
        log.error(
            "unhandled error",
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"method": method},
        )
        return grpc.StatusCode.INTERNAL, f"internal error (request id {rid})"

    def _finish(
        self,
        method: str,
        context: Any,
        start: float,
        infra: bool,
        code: grpc.StatusCode | None,
        principal: str | None,
    ) -> None:
        elapsed = time.perf_counter() - start
        if code is None:
            code = context.code() or grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        children = self._children.get((method, name))
        if children is None:
            children = (
                RPC_REQUESTS.labels(self.service, method, name),
                RPC_LATENCY.labels(self.service, method, name),
            )
            self._children[(method, name)] = children
        children[0].inc()
        children[1].observe(elapsed)
        # Successful calls are logged at DEBUG: a JSON line per call costs more than the
        # call itself at a thousand calls a second. Failures are always logged.
        level = logging.DEBUG if name == "OK" else logging.INFO
        if log.isEnabledFor(level):
            extra: dict[str, Any] = {
                "method": method,
                "code": name,
                "duration_ms": round(elapsed * 1000, 3),
            }
            if principal:
                extra["principal"] = principal
            log.log(level, "rpc", extra=extra)


class RuntimeInterceptor(_Runtime, grpc.aio.ServerInterceptor):
    """Request id, authentication, metrics, access log and error mapping (asyncio)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        return self._wrapped(handler, method) if handler is not None else None

    async def _fail(
        self, context: grpc.aio.ServicerContext, exc: BaseException, rid: str, method: str
    ) -> None:
        code, message = self._failure(exc, rid, method)
        await context.abort(code, message, trailing_metadata=((REQUEST_ID_KEY, rid),))

    def _wrap_unary(
        self,
        behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
        method: str,
        infra: bool,
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            metadata = context.invocation_metadata() or ()
            rid = self._request_id(metadata, context)
            self.in_flight.inc()
            code: grpc.StatusCode | None = None
            principal: str | None = None
            try:
                await context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
                principal = self._begin(method, metadata, infra, request)
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._fail(context, exc, rid, method)
            finally:
                self.in_flight.dec()
                self._finish(method, context, start, infra, code, principal)

        return wrapper

    def _wrap_stream(
        self,
        behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
        method: str,
        infra: bool,
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            metadata = context.invocation_metadata() or ()
            code: grpc.StatusCode | None = None
            principal: str | None = None
            rid = self._request_id(metadata, context)
            try:
                principal = self._begin(method, metadata, infra, request)
                async for item in behavior(request, context):
                    yield item
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._fail(context, exc, rid, method)
            finally:
                self._finish(method, context, start, infra, code, principal)

        return wrapper


class SyncRuntimeInterceptor(_Runtime, grpc.ServerInterceptor):
    """The same runtime for a synchronous ``grpc.server`` (a thread pool): request id in
    the initial and trailing metadata, authentication, the request check, metrics, the
    access log and the same status for every exception."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = continuation(handler_call_details)
        return self._wrapped(handler, method) if handler is not None else None

    def _fail(
        self, context: grpc.ServicerContext, exc: BaseException, rid: str, method: str
    ) -> None:
        code, message = self._failure(exc, rid, method)
        context.abort(code, message)  # the trailing metadata is already set

    def _wrap_unary(
        self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str, infra: bool
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            metadata = context.invocation_metadata() or ()
            rid = self._request_id(metadata, context)
            self.in_flight.inc()
            principal: str | None = None
            try:
                context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
                principal = self._begin(method, metadata, infra, request)
                return behavior(request, context)
            except Exception as exc:
                if _is_abort(exc):
                    raise
                self._fail(context, exc, rid, method)
            finally:
                self.in_flight.dec()
                self._finish(method, context, start, infra, None, principal)

        return wrapper

    def _wrap_stream(
        self,
        behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
        method: str,
        infra: bool,
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            metadata = context.invocation_metadata() or ()
            principal: str | None = None
            rid = self._request_id(metadata, context)
            try:
                principal = self._begin(method, metadata, infra, request)
                yield from behavior(request, context)
            except Exception as exc:
                if _is_abort(exc):
                    raise
                self._fail(context, exc, rid, method)
            finally:
                self._finish(method, context, start, infra, None, principal)

        return wrapper


def _is_abort(exc: BaseException) -> bool:
    """The exception a synchronous ``context.abort`` raises (a bare ``Exception``, with
    the status already set on the context)."""
    return type(exc) is Exception and not exc.args
