"""API keys on the public API: ``authorization: Bearer KEY`` metadata checked by an interceptor.

Health checks and reflection stay open (Kubernetes probes carry no key). A key is an identity, its
tenant (``tenant_of``): request ids live in the tenant's namespace (``namespaced``), so only the
key that started a request can abort or resume it, and rate limits are per tenant.
"""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import grpc

_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def read_api_keys(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are ignored."""
    keys = [line.strip() for line in Path(path).read_text().splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"--api-keys-file: {path} holds no key")
    return keys


def tenant_of(metadata) -> str:
    """The caller's tenant: a short hash of its API key (never the key itself), "" without one."""
    header = dict(metadata or ()).get("authorization", "")
    token = header[len("Bearer "):] if header.startswith("Bearer ") else ""
    return hashlib.sha256(token.encode()).hexdigest()[:16] if token else ""


def namespaced(tenant: str, request_id: str) -> str:
    """The id a tenant's request has inside the cluster (Redis records, replicas)."""
    return f"{tenant}.{request_id}" if tenant else request_id


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """For the router's ``grpc.aio`` server."""

    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys]

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_OPEN_PREFIXES) or self._authorised(handler_call_details):
            return await continuation(handler_call_details)
        return _DENY

    def _authorised(self, details) -> bool:
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        token = header[len("Bearer "):].encode() if header.startswith("Bearer ") else b""
        return any(hmac.compare_digest(token, key) for key in self._keys)


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: a valid 'Bearer <api key>' is required")


_DENY = grpc.unary_unary_rpc_method_handler(_deny)
