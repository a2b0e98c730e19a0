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

from esolm.commands import _args
from esolm.evaluation.datasets import ZERO_SHOT_SUITE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a save_pretrained folder, a training checkpoint, a shipped model (esolm-small) "
                                 "or a Hugging Face repo id")
    p.add_argument("--data", default=None,
                   help="data source: wiki (embedded corpus), a .txt/.jsonl path, or a corpus name "
                        "(openwebtext, lm1b, wikitext2, ...; network); default: the model's training source")
    p.add_argument("--split", default="validation", choices=("validation", "train"))
    p.add_argument("--zero-shot", nargs="?", type=_args.choice_list(ZERO_SHOT_SUITE), const=list(ZERO_SHOT_SUITE),
                   default=None, metavar="NAMES",
                   help=f"evaluate on the paper's zero-shot suite (default all: {','.join(ZERO_SHOT_SUITE)}; "
                        "needs network and the datasets package) instead of --data")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or folder (default: saved with the model)")
    p.add_argument("--length", type=_args.positive_int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--mode", default=None, choices=("pack", "pad"), help="sequence building (default pack)")
    p.add_argument("--val-fraction", type=_args.open_fraction, default=None,
                   help="held-out fraction of the source")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the document split (default: the training recipe's)")
    p.add_argument("--max-documents", type=_args.positive_int, default=None, help="use only the first N documents")
    p.add_argument("--batch-size", type=_args.positive_int, default=16)
    p.add_argument("--max-batches", type=_args.positive_int, default=None, help="evaluate only the first N batches")
    p.add_argument("--iw-k", type=_args.positive_int_list, default=[], metavar="K1,K2,..",
                   help="importance-weighted bound with K orders (causal Eso-LM (B) only), e.g. 1,4,16")
    p.add_argument("--iw-alpha0", type=_args.unit_interval, default=None,
                   help="alpha0 of the IW orders (default: the model's)")
    p.add_argument("--iw-chunk", type=_args.positive_int, default=None,
                   help="(order, sequence) rows per forward pass (default: --batch-size, fewer when that does "
                        "not fit in free memory; the random orders depend on it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:N, mps ... (default: the available accelerator, else cpu)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")


def _short(label: str) -> str:
    """A file source's name without its folder, for the table (the JSON keeps the full label)."""
    path, _, split = label.rpartition(":")
    return f"{Path(path).name}:{split}" if path and Path(path).exists() else label


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from esolm.devices import resolve_device
    from esolm.errors import UserError
    from esolm.evaluation.datasets import PAD_MODE_SOURCES, eval_texts, resolve_data, token_dataset, zero_shot_texts
    from esolm.evaluation.perplexity import check_iw_ks, evaluate, iw_chunk_rows
    from esolm.io import atomic_json, check_writable, load_model
    from esolm.methods import require_any_order

    ks, zero_shot = args.iw_k, args.zero_shot or []
    check_iw_ks(ks)
    device = resolve_device(args.device)
    if args.json:
        check_writable(args.json)
    loaded = load_model(args.model, tokenizer=args.tokenizer, device=device, require_tokenizer=True)
    model, method, tokenizer = loaded.model, loaded.method, loaded.tokenizer
    length = args.length or model.config.length
    if length > model.config.length:
        raise UserError(f"--length {length} exceeds the model's length {model.config.length}")
    iw_chunk = None
    if ks:
        require_any_order(method, f"--iw-k ({args.model})")
        iw_chunk = iw_chunk_rows(model.config, args.batch_size, args.iw_chunk, device)

    data = resolve_data(loaded.data, args.data, args.val_fraction, args.split_seed, args.max_documents, args.mode)
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
                       iw_alpha0=args.iw_alpha0, iw_chunk=iw_chunk, seed=args.seed, max_batches=args.max_batches)
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
        payload = {"model": str(args.model), "method": method.to_dict(), "tokenizer": tokenizer.name,
                   "length": length, "data": None if zero_shot else data, "seed": args.seed,
                   "batch_size": args.batch_size, "iw_k": ks, "seconds": time.perf_counter() - t0,
                   "results": [r.to_dict() for r in results]}
        atomic_json(args.json, payload)
    return 0
