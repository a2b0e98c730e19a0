"""Time one training step (forward + backward + AdamW) of AR, MDLM and Eso-LM (B), and one likelihood
pass (single-pass any-order log-likelihood vs one MDLM NELBO forward), in float32 and bf16 autocast.

Methods are interleaved (the order rotates every round) and medians reported, so a shared, noisy
machine affects all of them alike. Ratios are to MDLM in the same precision and the same run.

    python benchmarks/train_step.py                   # small paper-like model -> results/train_step.md
    python benchmarks/train_step.py --quick --out -   # smoke test, prints the table
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

from esolm.likelihood import anyorder_loglik
from esolm.methods import model_config_for
from esolm.model.backbone import DiT
from esolm.objectives import build_objective
from esolm.orders import sample_orders

METHODS = {
    "AR": {"name": "ar"},
    "MDLM": {"name": "mdlm"},
    "Eso-LM (B) a0=0.25 k=0.5": {"name": "esolm", "variant": "B", "alpha0": 0.25, "batch_split": 0.5},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192, help="including the mask token")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=3, help="timed rounds (each round runs every method once)")
    p.add_argument("--eval-reps", type=int, default=5, help="timed rounds of the no-grad likelihood passes")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.md"),
                   help="markdown output ('-' = stdout only)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.length, args.batch, args.vocab = 2, 64, 2, 32, 4, 128
        args.reps, args.eval_reps = 2, 2
    return args


def autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def make_model(method: dict, args) -> DiT:
    v = args.vocab
    cfg = model_config_for(method, vocab_size=v, mask_id=None if method["name"] == "ar" else v - 1,
                           hidden_size=args.hidden, cond_dim=128, n_layers=args.layers, n_heads=args.heads,
                           length=args.length, dropout=args.dropout)
    return DiT(cfg)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). CPU time is less sensitive to other jobs."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    dtypes = [d for d in args.dtypes.split(",") if d]
    x = torch.randint(0, args.vocab - 1, (args.batch, args.length))
    gen = torch.Generator().manual_seed(args.seed)

    runs = {}  # (method, dtype) -> step closure
    for name, method in METHODS.items():
        model = make_model(method, args).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        obj = build_objective(method)
        for dt in dtypes:
            def step(model=model, opt=opt, obj=obj, dt=dt, x=x):
                opt.zero_grad(set_to_none=True)
                with autocast(dt, device):
                    loss = obj(model, x, generator=gen).loss
                loss.backward()
                opt.step()
            runs[(name, dt)] = step

    eso = make_model(METHODS["Eso-LM (B) a0=0.25 k=0.5"], args).eval()
    mdlm = make_model(METHODS["MDLM"], args).eval()
    mdlm_eval = build_objective(METHODS["MDLM"]).eval()
    orders = sample_orders(args.batch, args.length, 0.25, gen)
    evals = {}
    for dt in dtypes:
        def anyorder(dt=dt):
            with torch.no_grad(), autocast(dt, device):
                anyorder_loglik(eso, x, orders)

        def nelbo_pass(dt=dt):
            with torch.no_grad(), autocast(dt, device):
                mdlm_eval(mdlm, x, generator=gen)
        evals[("any-order log-lik (one 2L pass)", dt)] = anyorder
        evals[("MDLM NELBO (one L pass)", dt)] = nelbo_pass

    t_start = time.perf_counter()
    for fn in runs.values():  # warm-up (small batch: kernels and lazy initialisation)
        fn(x=x[:2])
    for fn in evals.values():
        fn()
    times = {k: [] for k in list(runs) + list(evals)}
    for group, reps in ((runs, args.reps), (evals, args.eval_reps)):
        keys = list(group)
        for r in range(reps):
            rot = keys[r % len(keys):] + keys[:r % len(keys)]  # rotate the order every round
            for k in rot:
                times[k].append(timed(group[k]))
    total = time.perf_counter() - t_start
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    med_cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}

    cmd = "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Training-step and likelihood-pass timings (CPU)",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; torch {torch.__version__}; "
        f"{platform.processor() or platform.machine()}; {torch.get_num_threads()} threads; "
        f"{os.cpu_count()} logical CPUs (shared with other jobs, so absolute times are noisy).  ",
        f"Model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, L={args.length}, "
        f"batch {args.batch}, vocab {args.vocab}, dropout {args.dropout}. Step = forward + backward + AdamW. "
        f"Medians of {args.reps} interleaved rounds (likelihood passes: {args.eval_reps}) after a warm-up; "
        f"wall time of the timed part {total:.0f} s. Wall = elapsed seconds; CPU = CPU seconds used by "
        "this process (both threads), less disturbed by other jobs on the machine.",
        "",
        "| method | precision | median wall (s) | wall ratio to MDLM | median CPU (s) | CPU ratio to MDLM "
        "| wall samples (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, dt), v in times.items():
        ref = ("MDLM NELBO (one L pass)" if (name, dt) in evals else "MDLM", dt)
        k = (name, dt)
        lines.append(f"| {name} | {dt} | {med[k]:.3f} | {med[k] / med[ref]:.2f} | {med_cpu[k]:.3f} | "
                     f"{med_cpu[k] / med_cpu[ref]:.2f} | {', '.join(f'{w:.2f}' for w, _ in v)} |")
    lines += [
        "",
        "Eso-LM's sequential (AR) term runs a 2L-token pass on its half of the batch and the MDM term an "
        "L-token pass on the other half. The any-order log-likelihood row is one 2L pass with the "
        "sequential mask, giving all L conditionals of one order; its ratio is to one MDLM NELBO forward "
        "pass (one noise draw), in the same precision.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
