"""``epserve loadtest run|report|sharegpt`` (or ``python -m epserve.load_tests ...``): the command line (see docs/load_testing.md)."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path

import numpy as np

from epserve.load_tests import fault as faults
from epserve.load_tests.metrics import parse_slo, summarize
from epserve.load_tests.progress import Progress
from epserve.load_tests.report import write_report
from epserve.load_tests.results import build_result, format_summary, format_sweep, rate_field, write_result
from epserve.load_tests.runner import LoadConfig, run_load, warm_up
from epserve.load_tests.targets import EpserveTarget, OpenAITarget, Sampling, Target, TargetError
from epserve.load_tests.workloads import (
    FIRST_TOKEN_ID,
    LengthDist,
    RequestSpec,
    make_sharegpt,
    prefix_requests,
    random_requests,
    sharegpt_requests,
    token_counter,
)
from epserve.services.up_state import read_up_state


class UsageError(Exception):
    pass


def _arg(parse):
    """An argparse ``type`` that keeps the parser's own message of a ValueError."""
    def checked(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    checked.__name__ = parse.__name__
    return checked


def _list(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if not values or any(not v > 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: give positive values separated by commas")
        return values
    return parse


def add_run_parser(commands) -> None:
    p = commands.add_parser("run", help="measure a target under load (a sweep when given several rates/concurrencies)")
    t = p.add_argument_group("target")
    t.add_argument("--target", choices=("epserve", "openai"), default="epserve")
    t.add_argument("--endpoint", help="epserve: HOST:PORT (default 127.0.0.1:50051); openai: base URL "
                                      "(default http://127.0.0.1:8000)")
    t.add_argument("--path", default="/v1/completions",
                   help="openai: /v1/completions, or /v1/chat/completions (text prompts: --workload sharegpt)")
    t.add_argument("--model", help="openai: model name (default: the first of /v1/models)")
    t.add_argument("--api-key", help="default $EPSERVE_API_KEY or $OPENAI_API_KEY")
    t.add_argument("--extra-body", type=_arg(json.loads), default={},
                   help="openai: JSON merged into every request body, e.g. '{\"return_token_ids\": true}' "
                        "for exact tokens per chunk from vLLM")
    t.add_argument("--temperature", type=float, help="default: the server's")
    t.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction,
                   help="generate exactly the output length (default: on for random and prefix, off for sharegpt)")
    t.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request is abandoned")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=("random", "prefix", "sharegpt"), default="random")
    w.add_argument("--input-len", type=_arg(LengthDist.parse), default=LengthDist.parse("128"),
                   help="N | uniform:LO:HI | normal:MEAN:STD | lognormal:MEDIAN:SIGMA (prefix: the suffix's length)")
    w.add_argument("--output-len", type=_arg(LengthDist.parse),
                   help="as --input-len; default 32 (sharegpt: the reply's length)")
    w.add_argument("--token-range", help=f"LO:HI token ids of random prompts (default {FIRST_TOKEN_ID}:vocab size)")
    w.add_argument("--vocab-size", type=int, help="openai: vocabulary size for random prompts")
    w.add_argument("--prefix-groups", type=int, default=4)
    w.add_argument("--prefix-len", type=int, default=256)
    w.add_argument("--dataset", help="sharegpt: path of a ShareGPT-format JSON file")
    w.add_argument("--tokenizer", default="bytes", help="sharegpt: 'bytes' or a tokenizer.json (or its directory)")
    w.add_argument("--max-len", type=int, default=2048, help="sharegpt: skip pairs longer than this in all")
    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=_list(float), default=[math.inf], help="req/s, e.g. 1,2,4 (default inf)")
    load.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; <1 burstier, >1 more regular")
    load.add_argument("--max-concurrency", type=_list(int), default=[None], help="e.g. 1,4,16 (default none)")
    load.add_argument("--num-prompts", type=int, default=100, help="requests per run")
    load.add_argument("--duration", type=float, help="seconds after which no request is sent")
    load.add_argument("--num-warmups", type=int, default=0)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--slo", type=_arg(parse_slo), default={}, help="ttft=MS,tpot=MS,e2el=MS for goodput")
    f = p.add_argument_group("fault (a local `epserve up` cluster)")
    f.add_argument("--fault", type=_arg(faults.Fault.parse),
                   help="SERVICE@SECONDS, e.g. expert:1@10, attention:0@5, router@5")
    f.add_argument("--fault-signal", choices=("SIGKILL", "SIGTERM"), default="SIGKILL")
    f.add_argument("--up-state", type=Path, help="the state file of the `epserve up` serving the endpoint "
                                                 "(`epserve up --state-file PATH`): where --fault finds its process")
    f.add_argument("--recovery-threshold", type=float, default=0.8, help="fraction of the pre-fault throughput")
    f.add_argument("--recovery-bin", type=float, default=1.0, help="seconds per throughput bin")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", type=Path, default=Path("load_test_results"))
    o.add_argument("--label", help="name of this target's runs (default: the backend)")
    o.add_argument("--no-report", action="store_true", help="write no HTML report")
    o.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.fault and len(args.request_rate) * len(args.max_concurrency) > 1:
        raise UsageError("--fault: one run at a time (one rate and one concurrency)")
    if args.fault and args.target != "epserve":
        raise UsageError("--fault needs --target epserve (a local `epserve up` cluster)")
    if args.fault and not args.up_state:
        raise UsageError("--fault needs --up-state PATH (start the cluster with `epserve up --state-file PATH`)")
    if args.num_prompts < 1 or args.num_warmups < 0:
        raise UsageError("--num-prompts must be >= 1 and --num-warmups >= 0")
    for name in ("burstiness", "request_timeout", "duration", "recovery_bin", "recovery_threshold"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0")
    if args.fault:
        args.fault = dataclasses.replace(args.fault, signal=args.fault_signal)
    if args.target == "openai" and args.path.endswith("/chat/completions") and args.workload != "sharegpt":
        raise UsageError(f"--path {args.path} sends text messages: use --workload sharegpt (random and prefix "
                         f"prompts are token ids)")
    args.endpoint = args.endpoint or ("127.0.0.1:50051" if args.target == "epserve" else "http://127.0.0.1:8000")
    args.label = args.label or args.target
    if args.ignore_eos is None:
        args.ignore_eos = args.workload != "sharegpt"
    return asyncio.run(_run_all(args))


def _target(args: argparse.Namespace) -> Target:
    sampling = Sampling(args.temperature, args.ignore_eos)
    if args.target == "epserve":
        api_key = args.api_key or os.environ.get("EPSERVE_API_KEY")
        return EpserveTarget(args.endpoint, sampling, args.request_timeout, api_key)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    return OpenAITarget(args.endpoint, args.path, args.model, sampling, api_key, args.extra_body, args.vocab_size)


def _workload(args: argparse.Namespace, vocab_size: int | None, n: int) -> tuple[list[RequestSpec], dict]:
    rng = np.random.default_rng(args.seed)
    output_len = args.output_len or (None if args.workload == "sharegpt" else LengthDist.parse("32"))
    if args.workload == "sharegpt":
        if not args.dataset:
            raise UsageError("--workload sharegpt needs --dataset PATH (make one with `python -m epserve.load_tests sharegpt`)")
        try:
            specs = sharegpt_requests(args.dataset, n, token_counter(args.tokenizer), args.max_len, output_len, rng)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"--dataset {args.dataset}: {err!r}") from None
        return specs, {"name": "sharegpt", "dataset": args.dataset, "tokenizer": args.tokenizer,
                       "output_len": str(output_len) if output_len else "reply"}
    if args.token_range:
        lo, _, hi = args.token_range.partition(":")
        if not (lo.isdigit() and hi.isdigit() and int(lo) < int(hi)):
            raise UsageError(f"--token-range {args.token_range!r}: use LO:HI with 0 <= LO < HI")
        token_range = (int(lo), int(hi))
    elif vocab_size:
        token_range = (FIRST_TOKEN_ID, vocab_size)
    else:
        raise UsageError("random prompts need --vocab-size or --token-range LO:HI")
    params = {"input_len": str(args.input_len), "output_len": str(output_len), "token_range": list(token_range)}
    if args.workload == "random":
        return random_requests(n, args.input_len, output_len, token_range, rng), {"name": "random", **params}
    specs = prefix_requests(n, args.prefix_groups, args.prefix_len, args.input_len, output_len, token_range, rng)
    return specs, {"name": "prefix", "groups": args.prefix_groups, "prefix_len": args.prefix_len, **params}


def _fault_pid(args: argparse.Namespace) -> int | None:
    if not args.fault:
        return None
    try:
        return faults.service_pid(read_up_state(args.up_state), args.fault.service)
    except (OSError, LookupError, ValueError) as err:
        raise UsageError(f"--fault: {err}") from None


async def _run_all(args: argparse.Namespace) -> int:
    target = _target(args)
    try:
        await target.open()
    except TargetError as err:
        print(f"load_tests: cannot use the target: {err}", file=sys.stderr)
        return 1
    try:
        pid = _fault_pid(args)
        specs, workload = _workload(args, target.vocab_size, args.num_warmups + args.num_prompts)
        warmups, specs = specs[:args.num_warmups], specs[args.num_warmups:]
        results = []
        for rate in args.request_rate:
            for concurrency in args.max_concurrency:
                config = LoadConfig(rate, args.burstiness, concurrency, args.duration, args.request_timeout, args.seed)
                result = await _run_one(args, target, specs, warmups, workload, config, pid)
                print(format_summary(result))
                print(f"result: {write_result(result, args.out_dir)}")
                results.append(result)
        if len(results) > 1:
            print(format_sweep(results))
        if not args.no_report:
            report = args.out_dir / f"{args.label}-report-{results[0]['date']}.html"
            print(f"report: {write_report(results, report, f'{args.label}: load test of {target.model_id}')}")
        return 0
    finally:
        await target.close()


async def _run_one(args, target: Target, specs, warmups, workload: dict, config: LoadConfig, pid: int | None) -> dict:
    if warmups:
        await warm_up(target, warmups, config)
    log: dict = {}
    background = (lambda t0: faults.inject(args.fault, pid, t0, log)) if args.fault else None
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    title = f"rate {config.request_rate:g}" + (f" conc {config.max_concurrency}" if config.max_concurrency else "")
    progress = Progress(len(specs), title, enabled=not args.no_progress)
    out = await run_load(target, specs, config, progress, background)
    fault = None
    if args.fault:
        fault = {"service": args.fault.service, "at_s": args.fault.at_s, "signal": args.fault.signal,
                 "not_killed": f"the run ended before {args.fault.at_s:g} s", **log}
        if "killed_at_s" in log:
            del fault["not_killed"]
            fault.update(faults.analyse(out.records, log["killed_at_s"], args.recovery_bin, args.recovery_threshold))
    setup = {
        "date": date, "backend": target.backend, "label": args.label, "model_id": target.model_id,
        "tokenizer_id": args.tokenizer if args.workload == "sharegpt" else None, "num_prompts": args.num_prompts,
        "request_rate": rate_field(config.request_rate), "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency, "endpoint": args.endpoint, "workload": workload,
        "seed": config.seed, "num_warmups": len(warmups), "duration_limit_s": config.duration_s,
        "request_timeout_s": config.request_timeout_s, "slo": args.slo, "temperature": args.temperature,
        "ignore_eos": args.ignore_eos, "num_sent": len(out.records),
    }
    return build_result(setup, summarize(out.records, out.duration_s, args.slo), out.records, fault)


def add_report_parser(commands) -> None:
    p = commands.add_parser("report", help="an HTML report of result files (a sweep: several files)")
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("load_test_report.html"))
    p.add_argument("--title", default="epserve load test")
    p.add_argument("--svg-dir", type=Path, help="also write each chart there as an .svg file")

    def report(args: argparse.Namespace) -> int:
        try:
            results = [json.loads(f.read_text()) for f in args.results]
        except (OSError, ValueError) as err:
            raise UsageError(str(err)) from None
        print(write_report(results, args.out, args.title, args.svg_dir))
        return 0

    p.set_defaults(handler=report)


def add_sharegpt_parser(commands) -> None:
    p = commands.add_parser("sharegpt", help="write a synthetic ShareGPT-format JSON file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num", type=int, default=500, help="conversations")
    p.add_argument("--seed", type=int, default=0)

    def write(args: argparse.Namespace) -> int:
        args.out.write_text(json.dumps(make_sharegpt(args.num, args.seed), indent=1))
        print(args.out)
        return 0

    p.set_defaults(handler=write)


def main(argv: list[str] | None = None, prog: str = "python -m epserve.load_tests") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_run_parser, add_report_parser, add_sharegpt_parser):
        add(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as err:
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
