"""Training throughput (tokens/s) of the ``cpu-small`` recipe: AR, MDLM, Eso-LM (B) alpha0=0.25 and
BD3-LM (L'=4), float32 vs bf16 autocast.

Part 1 times the training step exactly as ``esolm.training.LitEsoLM`` runs it (objective loss on a real
batch of the embedded corpus, backward, gradient clipping at 1.0, AdamW step) without Lightning, with the
recipe's global batch (32 x 128 tokens). Methods and precisions are interleaved round by round and
medians reported, so a shared, noisy CPU affects them alike. Part 2 (``--lightning``) runs
``esolm train cpu-small`` for a few steps per setting and reports the tok/s Lightning logged, which adds
data loading, EMA, logging and the progress bar.

    python benchmarks/train_throughput.py                 # -> benchmarks/results/train_throughput.md
    python benchmarks/train_throughput.py --rounds 1 --steps 1 --out -   # smoke test
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

from esolm.model.backbone import DiT
from esolm.objectives import build_objective
from esolm.recipes import resolve
from esolm.training import prepare

METHODS = {
    "AR": ["method.name=ar"],
    "MDLM": ["method.name=mdlm"],
    "Eso-LM (B) a0=0.25": ["method.name=esolm", "method.variant=B", "method.alpha0=0.25"],
    "BD3-LM L'=4": ["method.name=bd3lm", "method.block_size=4"],
}
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


def make_step(overrides: list[str], precision: str, batch: dict):
    cfg = resolve("cpu-small", overrides)
    p = prepare(cfg)
    tok = p.tokenizer
    torch.manual_seed(0)
    model = DiT(cfg.model_config(tok.vocab_size, None if cfg.method.name == "ar" else tok.mask_id)).train()
    obj = build_objective(cfg.method_spec()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    gen = torch.Generator().manual_seed(0)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

    def step() -> float:
        with ctx():
            loss = obj(model, batch["input_ids"], batch["valid"], generator=gen).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    n_params = sum(q.numel() for q in model.parameters())
    return step, n_params, cfg


def raw_loop(rounds: int, steps: int) -> tuple[list[tuple], dict]:
    cfg = resolve("cpu-small")
    p = prepare(cfg)
    rows = list(range(cfg.trainer.global_batch))
    batch = {"input_ids": torch.stack([p.splits.train[i]["input_ids"] for i in rows]),
             "valid": torch.stack([p.splits.train[i]["valid"] for i in rows])}
    tokens = batch["input_ids"].numel()
    steps_fns, params = {}, {}
    for m, ov in METHODS.items():
        for pr in PRECISIONS:
            fn, n, _ = make_step(ov, pr, batch)
            fn()  # warm-up (first steps are slower: allocator, kernel selection)
            fn()
            steps_fns[(m, pr)], params[m] = fn, n
    times = {k: [] for k in steps_fns}
    cpu = {k: [] for k in steps_fns}
    keys = list(steps_fns)
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                steps_fns[k]()
            times[k].append((time.perf_counter() - t0) / steps)
            cpu[k].append((time.process_time() - c0) / steps)
    out = []
    for m in METHODS:
        med = {pr: statistics.median(times[(m, pr)]) for pr in PRECISIONS}
        cmed = {pr: statistics.median(cpu[(m, pr)]) for pr in PRECISIONS}
        out.append((m, params[m], *(tokens / med[pr] for pr in PRECISIONS), med["fp32"] / med["bf16"],
                    *(tokens / cmed[pr] for pr in PRECISIONS)))
    return out, {"tokens_per_step": tokens, "threads": torch.get_num_threads()}


def lightning_runs(steps: int) -> list[tuple]:
    out = []
    for m, ov in METHODS.items():
        row = [m]
        for prec in PRECISIONS.values():
            with tempfile.TemporaryDirectory() as d:
                cmd = [sys.executable, "-m", "esolm.cli", "train", "cpu-small", *ov, f"trainer.out_dir={d}",
                       f"trainer.max_steps={steps}", "trainer.val_every=0", "trainer.ckpt_every=0",
                       "trainer.log_every=1", "trainer.progress=false", f"trainer.precision={prec}",
                       "optim.ema=0.999", "trainer.resume=null"]
                subprocess.run(cmd, check=True, capture_output=True)
                recs = list(csv.DictReader(open(next(Path(d).glob("logs/*/metrics.csv")))))
                tps = [float(r["tok_s"]) for r in recs if r.get("tok_s")]
                row.append(statistics.median(tps[1:]) if len(tps) > 1 else float("nan"))
        out.append(tuple(row))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per setting per round")
    ap.add_argument("--lightning", type=int, default=0, help="also run esolm train for this many steps")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.md"))
    args = ap.parse_args()
    rows, info = raw_loop(args.rounds, args.steps)
    lines = [
        "# Training throughput, cpu-small recipe",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (shared), torch {torch.__version__}, {info['threads']} threads. "
        f"Command: `python benchmarks/train_throughput.py --rounds {args.rounds} --steps {args.steps}"
        + (f" --lightning {args.lightning}`" if args.lightning else "`") + ".",
        "",
        f"Training step = objective + backward + clip + AdamW on one global batch "
        f"({info['tokens_per_step']} tokens: 32 x 128), 4 x 128 DiT, 8k BPE vocabulary; "
        f"median over {args.rounds} interleaved rounds of {args.steps} steps.",
        "",
        "Wall-clock tokens/s is what a run sees; tokens per CPU-second (all threads of this process) is less "
        "sensitive to other jobs on the shared machine.",
        "",
        "| method | parameters | fp32 tokens/s | bf16 autocast tokens/s | bf16 speed-up (wall) "
        "| fp32 tokens/CPU-s | bf16 tokens/CPU-s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {n/1e6:.2f} M | {a:,.0f} | {b:,.0f} | {s:.2f}x | {ca:,.0f} | {cb:,.0f} |"
              for m, n, a, b, s, ca, cb in rows]
    if args.lightning:
        lines += ["", f"`esolm train cpu-small` ({args.lightning} steps, EMA, data loader, logging; median of "
                  "the logged tok/s after the first step):", "",
                  "| method | fp32 tokens/s | bf16-mixed tokens/s |", "|---|---|---|"]
        lines += [f"| {m} | {a:,.0f} | {b:,.0f} |" for m, a, b in lightning_runs(args.lightning)]
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(text)


if __name__ == "__main__":
    main()
