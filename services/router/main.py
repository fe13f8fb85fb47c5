"""``epserve serve router``: the public API (parse -> tokenizer + limits -> serve -> register -> SIGTERM)."""
from __future__ import annotations

import argparse
import logging
import uuid

import grpc

from epserve.services.cluster.grpc_server import start_aio_grpc_server
from epserve.services.cluster.registry import Registry
from epserve.services.cluster.state import PlacementStore, RequestStore
from epserve.services.engine.tokenizer import load_tokenizer
from epserve.services.lifecycle import advertised, start_service
from epserve.services.router.admission import Admission
from epserve.services.router.auth import ApiKeyInterceptor, read_api_keys
from epserve.services.router.service import SERVICE_NAME, GenerationServicer, add_to_server
from epserve.services.router.validation import Limits

log = logging.getLogger("epserve.router")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router-id", default=None, help="unique id (default: random)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests that may wait when every replica is full")
    parser.add_argument("--max-request-bytes", type=int, default=4 << 20)
    parser.add_argument("--max-concurrent-rpcs", type=int, default=1024,
                        help="calls served at once; beyond it a call is refused with RESOURCE_EXHAUSTED")
    parser.add_argument("--api-keys-file", default=None,
                        help="file of API keys, one per line: clients must send 'authorization: Bearer KEY'")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")


def run(args: argparse.Namespace) -> int:
    service = start_service(args)
    client, keys, path, config, stop = service.client, service.keys, service.model_path, service.config, service.stop
    tokenizer = load_tokenizer(path, vocab_size=config.vocab_size, bos_token_id=config.bos_token_id,
                               eos_token_ids=config.eos_token_ids)
    registry = Registry(client, keys)
    model_info = {"model": args.model, "vocab_size": config.vocab_size, "max_context": config.max_position_embeddings,
                  "kv_cache_bytes_per_token": config.kv_bytes_per_token(2), "eos_token_ids": list(config.eos_token_ids)}
    servicer = GenerationServicer(
        model_name=args.model, tokenizer=tokenizer, admission=Admission(registry, max_queue=args.max_queue),
        limits=Limits(config.vocab_size, config.max_position_embeddings, args.max_request_bytes),
        requests=RequestStore(client, keys), placements=PlacementStore(client, keys), model_info=model_info)
    interceptors = [ApiKeyInterceptor(read_api_keys(args.api_keys_file))] if args.api_keys_file else []
    server = start_aio_grpc_server(add_to_server(servicer), [SERVICE_NAME], address=f"{args.host}:{args.port}",
                                   max_message_bytes=2 * args.max_request_bytes, credentials=_tls_credentials(args),
                                   interceptors=interceptors, max_concurrent_rpcs=args.max_concurrent_rpcs)
    router_id = args.router_id or uuid.uuid4().hex[:8]
    heartbeat = registry.register("router", router_id, advertised(args, server.port), {})
    log.info("router %s serving on %s", router_id, server.address)
    stop.wait()
    heartbeat.stop()
    server.stop(grace=5)
    servicer.close()
    return 0


def _tls_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    if not args.tls_cert and not args.tls_key:
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    with open(args.tls_key, "rb") as key, open(args.tls_cert, "rb") as cert:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])
