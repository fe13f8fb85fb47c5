"""``epserve serve router|attention|expert``: run one service (what Helm and Ray Serve run)."""
from __future__ import annotations

import argparse
import importlib

SERVICES = {
    "router": ("epserve.services.router.main", "the public gRPC API: validation, admission, streaming"),
    "attention": ("epserve.services.attention.main", "an attention/prefill replica: KV cache and engine loop"),
    "expert": ("epserve.services.expert.main", "an expert shard: routed experts of its placement slots"),
}


def add_serve_parser(commands) -> None:
    from epserve.services.lifecycle import add_common_flags, add_model_flags

    serve = commands.add_parser("serve", help="run one service of a cluster", description=__doc__)
    kinds = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for name, (module, help_text) in SERVICES.items():
        parser = kinds.add_parser(name, help=help_text, description=help_text)
        add_common_flags(parser)
        if name != "router":
            add_model_flags(parser)
        importlib.import_module(module).add_arguments(parser)
        parser.set_defaults(handler=_run(module))


def _run(module: str):
    def handler(args: argparse.Namespace) -> int:
        return importlib.import_module(module).run(args)
    return handler
