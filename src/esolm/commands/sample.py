"""``esolm sample MODEL``: generate samples to JSONL, optionally with quality metrics.

Each JSONL row holds one sample: ``index``, ``text`` (decoded, special tokens dropped), ``token_ids``, and
the ``nfe`` (network calls) and ``seconds`` of the batch that produced it. ``--entropy``, ``--gen-ppl``
(judge LM, loaded once) and ``--mauve`` (against held-out text of ``--mauve-data``) print a summary,
which ``--summary PATH`` also writes as JSON.

Examples::

    esolm sample runs/tiny/export --num-samples 16 --steps 64 --top-p 0.9 --out samples.jsonl --entropy
    esolm sample runs/tiny/export --alpha0 0.0625 --gen-ppl --mauve --summary summary.json
    esolm sample runs/tiny/export --prompt "The history of" --max-length 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from esolm.errors import UserError
from esolm.evaluation import default_device, load_model, reference_texts, resolve_data, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a save_pretrained folder, a training checkpoint, or a Hugging Face repo id")
    p.add_argument("--out", default="samples.jsonl", help="JSONL output ('-' for stdout)")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: all at once)")
    p.add_argument("--steps", type=int, default=None, help="diffusion steps T (default: the sequence length)")
    p.add_argument("--alpha0", type=float, default=None,
                   help="Eso-LM sampling alpha0 (default: the trained one)")
    p.add_argument("--sampler", default="auto",
                   help="auto | ancestral | first_hitting | strided | left_to_right (method-dependent)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus filtering (the paper's quality runs: 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=None, help="text the samples continue (after the BOS token)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per sample (default: the model's length)")
    p.add_argument("--stop-at-eos", action="store_true", help="cut each sample after its first generated EOS")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or folder (default: saved with the model)")
    p.add_argument("--device", default=None,
                   help="torch device (default: the available accelerator, else cpu)")
    g = p.add_argument_group("metrics")
    g.add_argument("--entropy", action="store_true", help="mean per-sample unigram entropy (nats)")
    g.add_argument("--gen-ppl", action="store_true", help="generative perplexity under a judge LM")
    g.add_argument("--judge", default=None,
                   help="judge LM: smollm2 (default, offline, `make judge`), a .gguf file, a folder, or a "
                        "Hugging Face name such as gpt2-large (network)")
    g.add_argument("--judge-context", type=int, default=None, help="judge window (default: min(max, 1024))")
    g.add_argument("--judge-batch-size", type=int, default=8)
    g.add_argument("--mauve", action="store_true", help="MAUVE against held-out text (MiniLM features)")
    g.add_argument("--mauve-data", default=None,
                   help="reference text source, held-out split (default: the model's training source)")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="held-out fraction of --mauve-data (default: the training recipe's)")
    g.add_argument("--split-seed", type=int, default=None, help="seed of the document split")
    g.add_argument("--features", default=None,
                   help="sentence-embedding model folder (default: all-MiniLM-L6-v2)")
    g.add_argument("--summary", default=None, metavar="PATH", help="write the metrics summary as JSON")


def _check(args) -> None:
    for name in ("num_samples", "batch_size", "steps", "max_length", "judge_context", "judge_batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.alpha0 is not None and not 0.0 <= args.alpha0 <= 1.0:
        raise UserError(f"--alpha0 must be in [0, 1], got {args.alpha0}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.val_fraction is not None and not 0.0 < args.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.mauve and args.num_samples < 2:
        raise UserError("--mauve needs at least 2 samples")
    if args.out != "-" and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; give a .jsonl file path")


def generate_samples(model, method: dict, tokenizer, *, num_samples: int, batch_size: int | None = None,
                     steps: int | None = None, alpha0: float | None = None, top_p: float | None = None,
                     seed: int = 0, prompt: str | None = None, max_length: int | None = None,
                     sampler: str = "auto", stop_at_eos: bool = False, repeats: int = 1) -> list[dict]:
    """Samples as dicts (``index, text, token_ids, nfe, seconds``), batch by batch.

    Batch ``b`` uses seed ``seed * 1_000_003 + b``, so its samples do not depend on later batches and
    each row's ``nfe``/``seconds`` are those of its own batch. ``repeats > 1`` re-draws each batch with
    the same seed (the same samples) and keeps the fastest time: robust timings on a shared machine.
    """
    from esolm.sampling import generate

    prompt_ids = None
    if prompt:
        prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    bs = batch_size or num_samples
    rows = []
    for b, start in enumerate(range(0, num_samples, bs)):
        n = min(bs, num_samples - start)
        kw = dict(num_samples=n, prompt_ids=prompt_ids, steps=steps, alpha0=alpha0, top_p=top_p,
                  seed=seed * 1_000_003 + b, batch_size=n, max_length=max_length,
                  eos_id=tokenizer.eos_id if stop_at_eos else None, bos_id=tokenizer.bos_id, sampler=sampler)
        out = generate(model, method, **kw)
        seconds = out.seconds
        for _ in range(repeats - 1):
            seconds = min(seconds, generate(model, method, **kw).seconds)
        seqs = out.sequences()
        texts = tokenizer.decode_batch(seqs)
        for i, (ids, text) in enumerate(zip(seqs, texts)):
            rows.append({"index": start + i, "text": text, "token_ids": ids, "nfe": int(out.nfe),
                         "seconds": float(seconds), "batch": b})
    return rows


def quality_summary(rows: list[dict], *, entropy: bool = False, judge=None, featurizer=None,
                    reference: list[str] | None = None, ignore_ids=()) -> dict:
    """Entropy / generative perplexity / MAUVE of sample rows (``generate_samples`` output)."""
    from esolm.evaluation import metrics

    texts = [r["text"] for r in rows]
    out: dict = {"num_samples": len(rows)}
    if entropy:
        out["entropy"] = metrics.unigram_entropy([r["token_ids"] for r in rows], ignore_ids)
    if judge is not None:
        score = judge.score(texts)
        out.update({"gen_ppl": score.perplexity, "judge": judge.name, "judge_tokens": score.tokens})
    if featurizer is not None:
        if reference is None:
            raise UserError("MAUVE needs reference texts")
        out["mauve"] = metrics.mauve_text(texts, reference, featurizer)
        out["mauve_reference_samples"] = len(reference)
    return out


def _write_jsonl(path: str, rows: list[dict]) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path == "-":
        sys.stdout.write(lines)
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(lines, encoding="utf-8")
    os.replace(tmp, p)


def run(args) -> int:
    from rich.console import Console

    from esolm.evaluation import metrics

    _check(args)
    device = args.device or default_device()
    loaded = load_model(args.model, args.tokenizer, device=device)
    model, method, tokenizer = loaded.model, loaded.method, loaded.tokenizer
    if args.alpha0 is not None and method.name != "esolm":
        raise UserError(f"--alpha0 applies to Eso-LM models only; {args.model} is {method.label}")
    if args.max_length is not None and args.max_length > model.config.length:
        raise UserError(f"--max-length {args.max_length} exceeds the model's length {model.config.length}")
    # load the metric models before sampling, so a missing one fails fast
    judge = metrics.Judge.load(args.judge, device=device, context=args.judge_context,
                               batch_size=args.judge_batch_size) if args.gen_ppl else None
    featurizer = metrics.Featurizer.load(args.features, device=device) if args.mauve else None

    console = Console(stderr=True)
    t0 = time.perf_counter()
    rows = generate_samples(model, method, tokenizer, num_samples=args.num_samples, batch_size=args.batch_size,
                            steps=args.steps, alpha0=args.alpha0, top_p=args.top_p, seed=args.seed,
                            prompt=args.prompt, max_length=args.max_length, sampler=args.sampler,
                            stop_at_eos=args.stop_at_eos)
    _write_jsonl(args.out, rows)
    nfe = sum(r["nfe"] for r in {r["batch"]: r for r in rows}.values())
    seconds = sum(r["seconds"] for r in {r["batch"]: r for r in rows}.values())
    summary = {"model": str(args.model), "method": method.to_dict(), "num_samples": len(rows), "steps": args.steps,
               "alpha0": args.alpha0 if args.alpha0 is not None else getattr(method, "alpha0", None),
               "top_p": args.top_p,
               "seed": args.seed, "sampler": args.sampler, "nfe": nfe, "sampling_seconds": seconds}
    if args.out != "-":
        console.print(f"wrote {len(rows)} samples to {args.out} (NFE {nfe}, {seconds:.2f} s sampling, "
                      f"{time.perf_counter() - t0:.2f} s total)")
    if args.entropy or judge is not None or featurizer is not None:
        reference = None
        if featurizer is not None:
            data = resolve_data(loaded, args.mauve_data, args.val_fraction, args.split_seed)
            reference = reference_texts(data, tokenizer, args.max_length or model.config.length, len(rows))
        summary.update(quality_summary(rows, entropy=args.entropy, judge=judge,
                                       featurizer=featurizer, reference=reference))
        shown = {k: summary[k] for k in ("entropy", "gen_ppl", "mauve") if k in summary}
        console.print("  ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    if args.summary:
        write_json(args.summary, summary)
    return 0
