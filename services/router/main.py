"""``epserve serve router``: the public API (config -> tokenizer + limits -> serve -> register -> SIGTERM)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

from epserve.services.cluster.grpc_server import start_aio_grpc_server
from epserve.services.cluster.placement_versions import current_summary
from epserve.services.cluster.registry import Registry
from epserve.services.cluster.requests import RequestStore
from epserve.services.config import RouterConfig
from epserve.services.engine.tokenizer import load_tokenizer
from epserve.services.lifecycle import start_service
from epserve.services.metrics import WAITING, serve_metrics
from epserve.services.model.catalog import checkpoint_dir
from epserve.services.router.admission import Admission
from epserve.services.router.auth import ApiKeyInterceptor, read_api_keys
from epserve.services.router.chat import ChatTemplate
from epserve.services.router.openai_api import OpenAIApi
from epserve.services.router.rate_limit import RateLimiter
from epserve.services.router.service import SERVICE_NAME, GenerationServicer, add_to_server
from epserve.services.router.validation import Limits

log = logging.getLogger("epserve.router")


def run(config: RouterConfig) -> int:
    service = start_service(config)
    client, keys, model, stop = service.client, service.keys, service.model, service.stop
    tokenizer = load_tokenizer(checkpoint_dir(config.model), vocab_size=model.vocab_size,
                               bos_token_id=model.bos_token_id, eos_token_ids=model.eos_token_ids)
    registry = Registry(client, keys)
    model_info = {"model": served_model_name(config.model), "vocab_size": model.vocab_size, "max_context": model.max_position_embeddings,
                  "kv_cache_bytes_per_token": model.kv_bytes_per_token(2), "eos_token_ids": list(model.eos_token_ids)}
    servicer = GenerationServicer(
        model_name=config.model, tokenizer=tokenizer, admission=Admission(registry, max_queue=config.max_queue),
        limits=Limits(model.vocab_size, model.max_position_embeddings, config.max_request_bytes),
        requests=RequestStore(client, keys), placement_summary=lambda: current_summary(client, keys),
        model_info=model_info, resume_attempts=config.resume_attempts, tenants=bool(config.api_keys_file),
        rate_limiter=RateLimiter(client, keys, config.rate_limit, config.rate_burst) if config.rate_limit else None,
        replica_tls=service.tls)
    interceptors = [ApiKeyInterceptor(read_api_keys(config.api_keys_file))] if config.api_keys_file else []
    server = start_aio_grpc_server(add_to_server(servicer), [SERVICE_NAME], address=f"{config.host}:{config.port}",
                                   max_message_bytes=2 * config.max_request_bytes, credentials=_tls_credentials(config),
                                   interceptors=interceptors, max_concurrent_rpcs=config.max_concurrent_rpcs,
                                   health_address=config.health_address())
    http = None if config.http_port is None else serve_http(
        OpenAIApi(servicer, served_model_name(config.model), ChatTemplate.for_checkpoint(checkpoint_dir(config.model)),
                  read_api_keys(config.api_keys_file) if config.api_keys_file else None).app(),
        server.loop, config.host, config.http_port, config.tls_cert, config.tls_key)
    router_id = config.router_id or uuid.uuid4().hex[:8]
    info = {} if http is None else {"http_address": config.advertised(http.port)}
    metrics_port = serve_metrics(config.host, config.metrics_port)
    if metrics_port is not None:
        info["metrics_address"] = config.advertised(metrics_port)
        WAITING.set_function(lambda: servicer.admission.waiting)
    heartbeat = registry.register("router", router_id, config.advertised(server.port), info)
    log.info("router %s serving on %s%s", router_id, server.address,
             "" if http is None else f", OpenAI-compatible HTTP on {config.host}:{http.port}")
    stop.wait()
    heartbeat.stop()
    if http is not None:
        http.stop()
    server.stop(grace=5)
    servicer.close()
    return 0


def served_model_name(model: str) -> str:
    """The model's id on the OpenAI API: "tiny", or a checkpoint directory's name (no local path)."""
    return Path(model).name if model != "tiny" else model


@dataclass
class HttpServer:
    server: object               # uvicorn.Server
    port: int
    future: concurrent.futures.Future

    def stop(self) -> None:
        self.server.should_exit = True
        self.future.result(timeout=30)


def serve_http(app, loop: asyncio.AbstractEventLoop, host: str, port: int, tls_cert: str | None = None,
               tls_key: str | None = None) -> HttpServer:
    """Serve ``app`` with uvicorn on ``loop`` (the gRPC server's: its handlers call the servicer there);
    HTTPS with the router's certificate when it has one."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        raise RuntimeError(f"--http-port: cannot bind {host}:{port}: {err}") from None
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           ssl_certfile=tls_cert, ssl_keyfile=tls_key))
    future = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), loop)
    return HttpServer(server, sock.getsockname()[1], future)


def _tls_credentials(config: RouterConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert and not config.tls_key:
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    with open(config.tls_key, "rb") as key, open(config.tls_cert, "rb") as cert:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])
