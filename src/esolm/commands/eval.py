"""``esolm eval MODEL``: NELBO and importance-weighted perplexity on held-out or zero-shot data.

Examples::

    esolm eval runs/tiny/export                      # held-out split of the embedded corpus
    esolm eval runs/tiny/export --iw-k 1,4,16 --json eval.json
    esolm eval sahoo-diffusion/Eso-LM-B-alpha-0_25 --tokenizer gpt2 --zero-shot   # network
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from esolm.errors import UserError
from esolm.evaluation import (
    PAD_MODE_SOURCES,
    ZERO_SHOT_SUITE,
    default_device,
    eval_texts,
    evaluate,
    load_model,
    parse_int_list,
    resolve_data,
    token_dataset,
    write_json,
    zero_shot_texts,
)
from esolm.methods import require_any_order


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a save_pretrained folder, a training checkpoint, or a Hugging Face repo id")
    p.add_argument("--data", default=None,
                   help="data source: wiki (embedded corpus), a .txt/.jsonl path, or a corpus name "
                        "(openwebtext, lm1b, wikitext2, ...; network); default: the model's training source")
    p.add_argument("--split", default="validation", choices=("validation", "train"))
    p.add_argument("--zero-shot", nargs="?", const=",".join(ZERO_SHOT_SUITE), default=None, metavar="NAMES",
                   help=f"evaluate on the paper's zero-shot suite (default all: {','.join(ZERO_SHOT_SUITE)}; "
                        "needs network and the datasets package) instead of --data")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or folder (default: saved with the model)")
    p.add_argument("--length", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--mode", default=None, choices=("pack", "pad"), help="sequence building (default pack)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="held-out fraction of the source")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the document split (default: the training recipe's)")
    p.add_argument("--max-documents", type=int, default=None, help="use only the first N documents")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
    p.add_argument("--iw-k", default=None, metavar="K1,K2,..",
                   help="importance-weighted bound with K orders (causal Eso-LM (B) only), e.g. 1,4,16")
    p.add_argument("--iw-alpha0", type=float, default=None,
                   help="alpha0 of the IW orders (default: the model's)")
    p.add_argument("--iw-chunk", type=int, default=None, help="(order, sequence) rows per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None,
                   help="torch device (default: the available accelerator, else cpu)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")


def _check(args) -> tuple[list[int], list[str]]:
    """Validate every argument before any work."""
    for name in ("batch_size", "max_batches", "max_documents", "length", "iw_chunk"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.val_fraction is not None and not 0.0 < args.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.iw_alpha0 is not None and not 0.0 <= args.iw_alpha0 <= 1.0:
        raise UserError(f"--iw-alpha0 must be in [0, 1], got {args.iw_alpha0}")
    ks = parse_int_list(args.iw_k, "--iw-k") if args.iw_k else []
    names = [s.strip() for s in args.zero_shot.split(",") if s.strip()] if args.zero_shot else []
    unknown = [n for n in names if n not in ZERO_SHOT_SUITE]
    if unknown:
        raise UserError(f"unknown zero-shot dataset(s) {', '.join(unknown)} "
                        f"(choose from {', '.join(ZERO_SHOT_SUITE)})")
    return ks, names


def _short(label: str) -> str:
    """A file source's name without its folder, for the table (the JSON keeps the full label)."""
    path, _, split = label.rpartition(":")
    return f"{Path(path).name}:{split}" if path and Path(path).exists() else label


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    ks, zero_shot = _check(args)
    device = args.device or default_device()
    loaded = load_model(args.model, args.tokenizer, device=device)
    model, method, tokenizer = loaded.model, loaded.method, loaded.tokenizer
    length = args.length or model.config.length
    if length > model.config.length:
        raise UserError(f"--length {length} exceeds the model's length {model.config.length}")
    if ks:
        require_any_order(method, f"--iw-k ({args.model})")

    data = resolve_data(loaded, args.data, args.val_fraction, args.split_seed, args.max_documents, args.mode)
    sets = zero_shot or [data["source"]]
    console = Console(stderr=True)
    t0 = time.perf_counter()
    results = []
    for name in sets:
        if zero_shot:
            texts = zero_shot_texts(name)[: args.max_documents]
            mode = args.mode or ("pad" if name in PAD_MODE_SOURCES else "pack")
        else:
            texts = eval_texts(name, args.split, data["val_fraction"], data["split_seed"], data["max_documents"])
            mode = data["mode"]
        ids, valid = token_dataset(texts, tokenizer, length, mode)
        label = name if zero_shot else f"{name}:{args.split}"
        res = evaluate(model, method, ids, valid, dataset=label, batch_size=args.batch_size, iw_ks=ks,
                       iw_alpha0=args.iw_alpha0, iw_chunk=args.iw_chunk, seed=args.seed,
                       max_batches=args.max_batches)
        results.append(res)
        console.print(f"[dim]{label}: {res.sequences} sequences, {res.tokens} tokens, "
                      f"{res.seconds:.1f} s[/dim]")

    table = Table(title=f"esolm eval {args.model} ({method.label})")
    table.caption = "NELBO in nats/token; perplexities are upper bounds (exact for AR)"
    table.add_column("dataset", overflow="fold")
    for col in ("tokens", "NELBO", "PPL", *(f"IW K={k}" for k in ks)):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        table.add_row(_short(r.dataset), str(r.tokens), f"{r.nelbo:.4f}", f"{r.perplexity:.2f}",
                      *(f"{r.iw[k]['perplexity']:.2f}" for k in ks))
    Console().print(table)

    if args.json:
        payload = {"model": str(args.model), "method": method.to_dict(), "tokenizer": tokenizer.name, "length": length,
                   "data": None if zero_shot else data,
                   "seed": args.seed, "batch_size": args.batch_size, "iw_k": ks,
                   "seconds": time.perf_counter() - t0, "results": [r.to_dict() for r in results]}
        write_json(args.json, payload)
    return 0
