"""Engine decode throughput vs transformers' ``generate`` on the same model, same run.

    python -m benchmarks.bench_engine [--model tiny|DIR] [--batches 1,8,32] [--new-tokens 64] [--device cpu|cuda]

Both sides generate greedily from the same random prompts with EOS ignored (transformers gets
``min_new_tokens``), and the figure is generated tokens per second of wall time, prefill included,
plus decode-only tokens/s for the engine (steps after every request has its first token).
"""
from __future__ import annotations

import argparse
import time

import torch

from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.params import SamplingParams
from epserve.services.model.tiny import resolve_model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_engine(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[float, float]:
    """(tokens/s over the whole generation, decode-only tokens/s)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", prompt, params)
    _sync(device)
    start = time.perf_counter()
    first_token_done, emitted, decode_emitted = None, 0, 0
    while engine.has_unfinished():
        outputs = engine.step()
        emitted += sum(len(o.new_token_ids) for o in outputs)
        if first_token_done is not None:
            decode_emitted += sum(len(o.new_token_ids) for o in outputs)
        elif emitted >= len(prompts):
            _sync(device)
            first_token_done = time.perf_counter()
    _sync(device)
    end = time.perf_counter()
    return emitted / (end - start), decode_emitted / max(end - first_token_done, 1e-9)


def run_transformers(path, prompts: list[list[int]], new_tokens: int, device: str, dtype: torch.dtype) -> float:
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids[:, :4], max_new_tokens=2, do_sample=False, pad_token_id=0)      # warm-up
    _sync(device)
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    _sync(device)
    return (out.shape[1] - ids.shape[1]) * len(prompts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    path = resolve_model(args.model)
    engine = LLMEngine.from_path(path, EngineConfig(block_size=16, num_kv_blocks=1024, max_num_seqs=256,
                                                    max_num_batched_tokens=4096, micro_batches=1),  # experts in-process
                                 dtype=dtype, device=args.device)
    vocab = engine.model_config.vocab_size
    print(f"model={args.model} device={args.device} dtype={dtype} prompt_len={args.prompt_len} "
          f"new_tokens={args.new_tokens} kv_bytes_per_token={engine.runner.kv_bytes_per_token}")
    print(f"{'batch':>5} {'engine tok/s':>13} {'engine decode tok/s':>20} {'transformers tok/s':>19} {'ratio':>6}")
    generator = torch.Generator().manual_seed(0)
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=generator).tolist()
        run_engine(engine, prompts, args.new_tokens, args.device)        # warm-up: Triton compiles per shape
        ours, ours_decode = run_engine(engine, prompts, args.new_tokens, args.device)
        theirs = float("nan") if args.no_transformers else run_transformers(path, prompts, args.new_tokens, args.device, dtype)
        print(f"{batch:>5} {ours:>13.1f} {ours_decode:>20.1f} {theirs:>19.1f} {ours / theirs:>6.2f}")


if __name__ == "__main__":
    main()
