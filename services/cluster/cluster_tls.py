"""Mutual TLS on the internal plane: who may call an attention replica or an expert shard.

Every service holds a certificate signed by the cluster's CA whose subject alternative names include
``KIND.epserve.internal`` (``identity(kind)``; KIND is router, attention, expert, or admin for
operators and tests). With ``--cluster-ca``, ``--cluster-cert`` and ``--cluster-key``:

- attention replicas and expert shards serve gRPC over TLS and require a client certificate signed by
  the CA (``server_credentials``): a caller without one fails the handshake (UNAVAILABLE);
- ``CallerCheck`` / ``AioCallerCheck`` then refuse (PERMISSION_DENIED) a caller whose certificate names
  no kind ``ALLOWED_CALLERS`` admits for the service: the attention service (``Session``, ``Abort``,
  ``Drain``, ``GetLoad``) to routers, the expert service (``Dispatch``, ``GetShardInfo``) to attention
  replicas; admin to both. Health checks and reflection admit any cluster certificate; any other service
  admin alone (deny by default);
- callers dial with their own certificate and check the server's: its certificate must name the kind
  they mean to reach (``channel``: the name is checked whatever address the registry gave, since pod IPs
  are in no certificate).

The router's public port is not part of this: clients use API keys and the router's own TLS.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import grpc

DOMAIN = "epserve.internal"
ADMIN = "admin"
ALLOWED_CALLERS = {"epserve.v1.AttentionService": ("router", ADMIN), "epserve.v1.ExpertService": ("attention", ADMIN)}
OPEN_TO_THE_CLUSTER = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")   # any cluster kind
_BEHAVIOURS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def identity(kind: str) -> str:
    """The DNS name a ``kind`` service's certificate carries: ``router.epserve.internal``."""
    return f"{kind}.{DOMAIN}"


@dataclass(frozen=True)
class ClusterTls:
    """The CA, certificate and key (PEM) of one service."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def from_files(cls, ca: str | None, cert: str | None, key: str | None) -> "ClusterTls | None":
        """None when no file is named; ValueError naming the flag when only some are, or one is unreadable."""
        paths = {"--cluster-ca": ca, "--cluster-cert": cert, "--cluster-key": key}
        if not any(paths.values()):
            return None
        missing = [flag for flag, path in paths.items() if not path]
        if missing:
            raise ValueError(f"{', '.join(missing)}: required with {', '.join(f for f in paths if f not in missing)} "
                             f"(mutual TLS needs the CA, a certificate and its key)")
        contents = []
        for flag, path in paths.items():
            try:
                contents.append(Path(path).read_bytes())
            except OSError as err:
                raise ValueError(f"{flag}: cannot read {path}: {err}") from None
        return cls(*contents)

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS that requires a client certificate signed by the CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def channel(address: str, tls: ClusterTls | None, server_kind: str, options: list, *, aio: bool = False):
    """A channel to a ``server_kind`` service: mutual TLS with ``tls``, else plaintext."""
    module = grpc.aio if aio else grpc
    if tls is None:
        return module.insecure_channel(address, options=options)
    options = [*options, ("grpc.ssl_target_name_override", identity(server_kind))]
    return module.secure_channel(address, tls.channel_credentials(), options=options)


def caller_kinds(context) -> set[str]:
    """The kinds the peer's certificate names (``KIND.epserve.internal`` subject alternative names)."""
    names = context.auth_context().get("x509_subject_alternative_name", [])
    suffix = f".{DOMAIN}"
    return {n.decode().removesuffix(suffix) for n in names if n.decode().endswith(suffix)}


def _allowed(method: str) -> tuple[str, ...] | None:
    """The kinds that may call ``method`` (``/package.Service/Method``); None: any cluster certificate (health,
    reflection); admin alone for a service listed nowhere (deny by default)."""
    service = method.split("/")[1]
    if service in OPEN_TO_THE_CLUSTER:
        return None
    return ALLOWED_CALLERS.get(service, (ADMIN,))


def _refusal(method: str, allowed: tuple[str, ...], kinds: set[str]) -> str:
    return (f"{method} admits callers with a {' or '.join(allowed)} certificate; this one names "
            f"{', '.join(sorted(kinds)) or 'no epserve kind'}")


class CallerCheck(grpc.ServerInterceptor):
    """For a sync server: PERMISSION_DENIED unless the caller's certificate names an allowed kind."""

    def intercept_service(self, continuation, handler_call_details):
        handler, method = continuation(handler_call_details), handler_call_details.method
        allowed = _allowed(method)
        if handler is None or allowed is None:
            return handler
        name = next(n for n in _BEHAVIOURS if getattr(handler, n))
        inner = getattr(handler, name)

        def guarded(request, context):
            kinds = caller_kinds(context)
            if not kinds & set(allowed):
                context.abort(grpc.StatusCode.PERMISSION_DENIED, _refusal(method, allowed, kinds))
            return inner(request, context)
        return handler._replace(**{name: guarded})


class AioCallerCheck(grpc.aio.ServerInterceptor):
    """As ``CallerCheck``, for a ``grpc.aio`` server."""

    async def intercept_service(self, continuation, handler_call_details):
        handler, method = await continuation(handler_call_details), handler_call_details.method
        allowed = _allowed(method)
        if handler is None or allowed is None:
            return handler
        name = next(n for n in _BEHAVIOURS if getattr(handler, n))
        inner = getattr(handler, name)

        async def check(context) -> None:
            kinds = caller_kinds(context)
            if not kinds & set(allowed):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, _refusal(method, allowed, kinds))

        if inspect.isasyncgenfunction(inner):
            async def guarded(request, context):
                await check(context)
                responses = inner(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:                               # its clean-up (a session's aborts) now, not when collected
                    await responses.aclose()
        else:
            async def guarded(request, context):
                await check(context)
                return await inner(request, context)
        return handler._replace(**{name: guarded})


def server_security(tls: ClusterTls | None, *, aio: bool) -> dict:
    """``credentials`` and ``interceptors`` of an internal server (``start_grpc_server`` and
    ``start_aio_grpc_server`` take them): mutual TLS and the caller check, or plaintext without ``tls``."""
    if tls is None:
        return {}
    return {"credentials": tls.server_credentials(), "interceptors": [AioCallerCheck() if aio else CallerCheck()]}
