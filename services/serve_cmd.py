"""``epserve serve router|attention|expert``: run one service (what Helm and Ray Serve run)."""
from __future__ import annotations

import argparse
import importlib

from epserve.services.config import SERVICE_CONFIGS
from epserve.services.flags import add_flags, from_args

SERVICES = {
    "router": ("epserve.services.router.main", "the public gRPC API: validation, admission, streaming"),
    "attention": ("epserve.services.attention.main", "an attention/prefill replica: KV cache and engine loop"),
    "expert": ("epserve.services.expert.main", "an expert shard: routed experts of its placement slots"),
}


def add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="run one service of a cluster", description=__doc__)
    kinds = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for kind, (module, help_text) in SERVICES.items():
        parser = kinds.add_parser(kind, help=help_text, description=help_text)
        add_flags(parser, SERVICE_CONFIGS[kind])
        parser.set_defaults(handler=_run(kind, module))


def _run(kind: str, module: str):
    def handler(args: argparse.Namespace) -> int:
        return importlib.import_module(module).run(from_args(SERVICE_CONFIGS[kind], args))
    return handler
