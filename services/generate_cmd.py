"""``epserve generate``: one prompt through the single-process engine or a cluster, printed as text or JSON."""
from __future__ import annotations

import argparse
import json
import os
import time

from epserve.services.usage import UsageError

FLAG_OF_FIELD = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p",
                 "top_k": "--top-k", "seed": "--seed", "prompt": "--prompt", "prompt_ids": "--prompt-ids",
                 "stop_token_ids": "--stop-token-ids"}


def add_generate_parser(commands) -> None:
    p = commands.add_parser("generate", help="generate from one prompt", description="Generate from one prompt.")
    p.add_argument("--model", default="tiny", help="'tiny' (built in, made locally) or a checkpoint directory")
    p.add_argument("--endpoint", default=None, help="HOST:PORT of a cluster's router: generate through the SDK")
    p.add_argument("--timeout", type=float, default=120.0, help="with --endpoint: the call's deadline in seconds")
    p.add_argument("--api-key", default=os.environ.get("EPSERVE_API_KEY"),
                   help="with --endpoint: sent as 'authorization: Bearer KEY' (default: $EPSERVE_API_KEY)")
    p.add_argument("--tls", action="store_true", help="with --endpoint: connect with TLS")
    p.add_argument("--root-certificates", default=None, help="with --tls: PEM file of trusted roots")
    p.add_argument("--wait-ready", type=float, default=0.0, metavar="SECONDS",
                   help="with --endpoint: first wait up to SECONDS for the router to be serving (a cluster starting)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (the tokenizer adds BOS)")
    prompt.add_argument("--prompt-ids", type=_token_ids, help="comma-separated token ids, used exactly as given")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="per-request seed: same seed, same tokens")
    p.add_argument("--stop-token-ids", type=_token_ids, default=())
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.set_defaults(handler=run_generate)


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def run_generate(args: argparse.Namespace) -> int:
    if args.endpoint:
        return run_remote(args)
    import torch

    from epserve.services.engine.engine import EngineConfig, LLMEngine
    from epserve.services.engine.params import InvalidParam, SamplingParams
    from epserve.services.model.tiny import resolve_model

    try:
        path = resolve_model(args.model)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # in-process experts: nothing to hide behind micro-batches, so one batch per step
    engine = LLMEngine.from_path(path, EngineConfig(micro_batches=1), device=device,
                                 dtype=getattr(torch, args.dtype) if args.dtype else None)
    prompt_ids = args.prompt_ids if args.prompt_ids is not None else engine.tokenizer.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop_token_ids=tuple(args.stop_token_ids),
                            ignore_eos=args.ignore_eos)
    try:
        engine.add_request("cli", prompt_ids, params)
    except InvalidParam as err:
        flag = FLAG_OF_FIELD.get(err.field, err.field)
        raise UsageError(f"{flag}: {str(err).split(': ', 1)[1]}") from None
    seq = engine.requests["cli"]
    start = time.perf_counter()
    while not seq.finished:
        engine.step()
    seconds = time.perf_counter() - start
    print_result(args, engine, seq, seconds)
    return 0


def print_result(args, engine, seq, seconds: float) -> None:
    text = engine.tokenizer.decode(seq.output_ids)
    if not args.json:
        print(text)
        return
    result = {
        "model": args.model, "token_ids": seq.output_ids, "text": text, "finish_reason": seq.finish_reason,
        "usage": {"prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.output_ids),
                  "total_tokens": seq.num_tokens},
        "kv_cache_bytes_per_token": engine.runner.kv_bytes_per_token,
        "seconds": round(seconds, 4), "tokens_per_s": round(len(seq.output_ids) / max(seconds, 1e-9), 2),
    }
    print(json.dumps(result))


def run_remote(args: argparse.Namespace) -> int:
    """The same generation through a cluster's public API, with the SDK; prints the same line."""
    import sys

    from epserve_client import Client, EpserveError

    prompt = args.prompt_ids if args.prompt_ids is not None else args.prompt
    roots = open(args.root_certificates, "rb").read() if args.root_certificates else None
    if args.wait_ready > 0 and not _wait_ready(args.endpoint, args.wait_ready, args.tls, roots):
        print(f"epserve generate: error: {args.endpoint} not serving after {args.wait_ready} s", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        with Client(args.endpoint, timeout=args.timeout, api_key=args.api_key, tls=args.tls,
                    root_certificates=roots) as client:
            result = client.generate(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                     stop_token_ids=tuple(args.stop_token_ids), ignore_eos=args.ignore_eos)
            info = client.model_info()
    except EpserveError as err:
        print(f"epserve generate: error: {err.code.name}: {err.message}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    if not args.json:
        print(result.text)
        return 0
    print(json.dumps({
        "model": info.model, "endpoint": args.endpoint, "request_id": result.request_id,
        "token_ids": result.token_ids, "text": result.text, "finish_reason": result.finish_reason,
        "usage": {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens,
                  "total_tokens": result.usage.total_tokens},
        "kv_cache_bytes_per_token": info.kv_cache_bytes_per_token,
        "seconds": round(seconds, 4), "tokens_per_s": round(len(result.token_ids) / max(seconds, 1e-9), 2),
    }))
    return 0


def _wait_ready(endpoint: str, seconds: float, tls: bool, roots: bytes | None) -> bool:
    """Poll the router's gRPC health check until it says SERVING or ``seconds`` pass."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + seconds
    channel = grpc.secure_channel(endpoint, grpc.ssl_channel_credentials(roots)) if tls else grpc.insecure_channel(endpoint)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    return False
