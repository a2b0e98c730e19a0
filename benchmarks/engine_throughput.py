"""Continuous batching without HTTP: ``esolm.serving.Engine`` throughput, ``--max-batch`` B vs 1, one run.

The same N requests (mixed ``max_tokens``: L/8, L/4, L/2; distinct seeds; all queued at once) are decoded by an
engine with ``max_batch = B`` and by one with ``max_batch = 1``; reports completion tokens/s, engine steps and
whether every request's tokens are identical in both. This is the engine's own gain; ``serve_load.py``
measures the server end to end (HTTP, per-step SSE events, clients on the same cores).

    .venv/bin/python benchmarks/engine_throughput.py MODEL [--requests 64] [--batches 32,1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def run(loaded, max_batch: int, n: int, seed: int = 0) -> tuple[float, int, int, dict]:
    from esolm.sampling.params import SamplingParams
    from esolm.serving.engine import CompletionRequest, Engine

    model, tok = loaded.model, loaded.tokenizer
    length = model.config.length
    mix = [length // 8, length // 4, length // 2]
    prompt = [tok.bos_id, *tok.encode("The history of")]
    engine = Engine(model, loaded.method, max_batch=max_batch, max_queue=n + 1, eos_id=None)
    done: dict = {}

    def on_event(ev):
        if type(ev).__name__ == "Finished":
            done[ev.request_id] = ev.tokens

    ids = []
    t0 = time.perf_counter()
    for i in range(n):
        req = CompletionRequest(prompt_ids=prompt, max_tokens=mix[i % 3], params=SamplingParams(seed=seed + i))
        ids.append(engine.submit(engine.check(req), on_event))
    steps = 0
    while engine.step():
        steps += 1
    seconds = time.perf_counter() - t0
    tokens = sum(mix[i % 3] for i in range(n))
    return seconds, tokens, steps, {i: done[r] for i, r in enumerate(ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--batches", default="32,1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "engine_throughput")
    args = ap.parse_args()
    from esolm.io import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    rows, outs = [], {}
    for b in [int(x) for x in args.batches.split(",")]:
        run(loaded, b, min(4, args.requests))  # warm-up
        seconds, tokens, steps, outs[b] = run(loaded, b, args.requests)
        rows.append({"max_batch": b, "requests": args.requests, "tokens": tokens, "seconds": seconds,
                     "tokens_per_second": tokens / seconds, "engine_steps": steps})
        print(f"max_batch={b}: {tokens / seconds:.0f} tok/s, {steps} steps, {seconds:.2f} s", flush=True)
    same = all(outs[rows[0]["max_batch"]][i] == outs[r["max_batch"]][i] for r in rows for i in range(args.requests))
    ratio = rows[0]["tokens_per_second"] / rows[-1]["tokens_per_second"]
    cfg = loaded.model.config
    report = {"model": args.model, "hidden": cfg.hidden_size, "layers": cfg.n_layers, "length": cfg.length,
              "vocab": cfg.vocab_size, "threads": args.threads, "rows": rows, "ratio": ratio, "identical": same}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# Engine throughput without HTTP", "",
             f"{args.requests} requests (max_tokens L/8, L/4, L/2) queued at once; model {cfg.n_layers} x "
             f"{cfg.hidden_size}, L = {cfg.length}, vocabulary {cfg.vocab_size}; {args.threads} threads; "
             "command `benchmarks/engine_throughput.py " + args.model + "`.", "",
             "| --max-batch | tokens/s | engine steps | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['max_batch']} | {r['tokens_per_second']:.0f} | {r['engine_steps']} | {r['seconds']:.2f} |"
              for r in rows]
    lines += ["", f"Ratio {rows[0]['max_batch']} / {rows[-1]['max_batch']}: {ratio:.2f}x; every request's tokens "
              f"identical in both: {same}.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print(f"ratio {ratio:.2f}x, identical {same}")


if __name__ == "__main__":
    main()
