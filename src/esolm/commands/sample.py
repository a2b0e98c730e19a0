"""``esolm sample MODEL``: generate samples to JSONL, optionally with quality metrics.

Each JSONL row holds one sample: ``index``, ``text`` (decoded, special tokens dropped), ``token_ids``, and
the ``nfe`` (network calls) and ``seconds`` of the batch that produced it. Rows are written batch by batch
(memory does not grow with ``--num-samples``); the file appears when the last batch is written.
``--entropy``, ``--gen-ppl`` (judge LM, loaded once) and ``--mauve`` (against held-out text of
``--mauve-data``) print a summary, which ``--summary PATH`` also writes as JSON.

The prompt is plain text: special-token strings in it (``<|endoftext|>``, ``<|mask|>``, ``[MASK]``) are
encoded as ordinary text, never as special tokens. ``--trace-html PATH`` also writes the first sample's
decoding trace (which network call decided each token) as a self-contained page.

Examples::

    esolm sample runs/tiny/export --num-samples 16 --steps 64 --top-p 0.9 --out samples.jsonl --entropy
    esolm sample runs/tiny/export --alpha0 0.0625 --gen-ppl --mauve --summary summary.json
    esolm sample runs/tiny/export --prompt "The history of" --max-length 64
    esolm sample runs/tiny/export --num-samples 1 --steps 16 --trace-html trace.html
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from esolm.commands import _args
from esolm.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a save_pretrained folder, a training checkpoint, a shipped model (esolm-small) "
                                 "or a Hugging Face repo id")
    p.add_argument("--out", default="samples.jsonl", help="JSONL output ('-' for stdout)")
    p.add_argument("--num-samples", type=_args.positive_int, default=8)
    p.add_argument("--batch-size", type=_args.positive_int, default=None,
                   help="samples per batch (default: min(--num-samples, 64))")
    p.add_argument("--steps", type=_args.positive_int, default=None,
                   help="diffusion steps T (default: the sequence length)")
    p.add_argument("--alpha0", type=_args.unit_interval, default=None,
                   help="Eso-LM sampling alpha0 (default: the trained one)")
    p.add_argument("--sampler", default="auto",
                   help="auto | ancestral | first_hitting | strided | left_to_right (method-dependent); "
                        "strided: --steps strides, then a left-to-right tail when alpha0 < 1")
    p.add_argument("--shuffle", action="store_true",
                   help="strided sampler: random order of the strides and within each stride")
    p.add_argument("--speculative", nargs="?", const=True, default=None, type=_args.int_at_least(2), metavar="K",
                   help="Eso-LM (B): lossless self-speculative decoding of the sequential phase (same law, fewer "
                        "network calls); K = draft length (default 4)")
    p.add_argument("--draft", choices=("fixed", "adaptive"), default=None,
                   help="--speculative: fixed draft length, or adaptive (grows after full acceptance, shrinks after a "
                        "rejection)")
    p.add_argument("--temperature", type=_args.float_in(0.0, 1e6), default=None,
                   help="divides the logits (default 1: the model's law); 0 decodes greedily")
    p.add_argument("--top-p", type=_args.top_p, default=None,
                   help="nucleus filtering, in (0, 1] (the paper's quality runs: 0.9)")
    p.add_argument("--seed", type=_args.int_at_least(0), default=0)
    p.add_argument("--prompt", type=_args.text, default=None,
                   help="text the samples continue (after the BOS token); plain text: special-token strings "
                        "such as <|endoftext|> or <|mask|> are encoded as ordinary text")
    p.add_argument("--max-length", type=_args.positive_int, default=None,
                   help="tokens per sample (default: the model's length)")
    p.add_argument("--stop-at-eos", action="store_true", help="cut each sample after its first generated EOS")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or folder (default: saved with the model)")
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:N, mps ... (default: the available accelerator, else cpu)")
    p.add_argument("--trace-html", default=None, metavar="PATH",
                   help="also write the decoding trace of the first sample (which step decided each token) as a "
                        "self-contained HTML page; re-draws the first batch with tracing on")
    g = p.add_argument_group("metrics")
    g.add_argument("--entropy", action="store_true", help="mean per-sample unigram entropy (nats)")
    g.add_argument("--gen-ppl", action="store_true", help="generative perplexity under a judge LM")
    g.add_argument("--judge", default=None,
                   help="judge LM: smollm2 (default, offline, `make judge`), a .gguf file, an esolm AR model "
                        "(folder or checkpoint), a folder, or a Hugging Face name such as gpt2-large (network)")
    g.add_argument("--judge-context", type=_args.int_at_least(2), default=None,
                   help="judge window (default: min(max, 1024))")
    g.add_argument("--judge-batch-size", type=_args.positive_int, default=8)
    g.add_argument("--mauve", action="store_true",
                   help="MAUVE against held-out text (MiniLM features; keeps one feature vector per sample)")
    g.add_argument("--mauve-data", default=None,
                   help="reference text source, held-out split (default: the model's training source)")
    g.add_argument("--val-fraction", type=_args.open_fraction, default=None,
                   help="held-out fraction of --mauve-data (default: the training recipe's)")
    g.add_argument("--split-seed", type=int, default=None, help="seed of the document split")
    g.add_argument("--features", default=None,
                   help="sentence-embedding model folder (default: all-MiniLM-L6-v2)")
    g.add_argument("--summary", default=None, metavar="PATH", help="write the metrics summary as JSON")


def run(args) -> int:
    from rich.console import Console

    from esolm.devices import resolve_device
    from esolm.evaluation import metrics
    from esolm.evaluation.datasets import reference_texts, resolve_data
    from esolm.evaluation.samples import JsonlWriter, SampleStats, sample_batches
    from esolm.io import atomic_json, check_writable, load_model
    from esolm.sampling.params import SamplingParams

    if args.mauve and args.num_samples < 2:
        raise UserError("--mauve needs at least 2 samples")
    device = resolve_device(args.device)
    outputs = {"--out": args.out, "--summary": args.summary, "--trace-html": args.trace_html}
    for flag, path in outputs.items():  # before any work; nothing is written yet
        if path is not None and not (flag == "--out" and path == "-"):
            try:
                check_writable(path)
            except UserError as e:
                raise UserError(f"{flag}: {e}") from None
    _check_distinct(outputs)
    writer = JsonlWriter(args.out)
    loaded = load_model(args.model, tokenizer=args.tokenizer, device=device, require_tokenizer=True)
    model, method, tokenizer = loaded.model, loaded.method, loaded.tokenizer
    params = SamplingParams.from_cli(args)
    if args.max_length is not None and args.max_length > model.config.length:
        raise UserError(f"--max-length {args.max_length} exceeds the model's length {model.config.length}")
    length = args.max_length or model.config.length
    prompt_ids = tokenizer.encode_prompt(args.prompt, length) if args.prompt is not None else None
    draws = sample_batches(model, method, tokenizer, num_samples=args.num_samples, batch_size=args.batch_size,
                           params=params, prompt_ids=prompt_ids, max_length=args.max_length,
                           stop_at_eos=args.stop_at_eos)  # checks the request
    # load the metric models (and the reference) before sampling, so a missing one fails fast
    judge = metrics.Judge.load(args.judge, device=device, context=args.judge_context,
                               batch_size=args.judge_batch_size) if args.gen_ppl else None
    featurizer, reference = None, None
    if args.mauve:
        featurizer = metrics.Featurizer.load(args.features, device=device)
        data = resolve_data(loaded.data, args.mauve_data, args.val_fraction, args.split_seed)
        reference = featurizer(reference_texts(data, tokenizer, length, args.num_samples))
    stats = SampleStats(entropy=args.entropy, judge=judge, featurizer=featurizer, reference_features=reference)

    console = Console(stderr=True)
    t0 = time.perf_counter()
    first = None
    with writer:
        for batch in draws:
            writer.write(batch.rows)
            stats.add(batch)
            first = first or batch.rows[0]
    if args.trace_html is not None:
        _write_trace(args, model, method, tokenizer, params, prompt_ids, first["token_ids"])
    resolved = params.resolve(method, length)
    summary = {"model": str(args.model), "method": method.to_dict(), **resolved.to_dict(),
               "nfe": stats.nfe, "sampling_seconds": stats.seconds, **stats.summary()}
    if args.out != "-":
        console.print(f"wrote {stats.num_samples} samples to {args.out} (NFE {stats.nfe}, {stats.seconds:.2f} s "
                      f"sampling, {time.perf_counter() - t0:.2f} s total)")
    shown = {k: summary[k] for k in ("entropy", "gen_ppl", "mauve") if k in summary}
    if shown:
        console.print("  ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    if args.summary is not None:
        atomic_json(args.summary, summary)
    return 0


def _check_distinct(outputs: dict[str, str | None]) -> None:
    """Refuse two outputs that are one file (the later write would replace the earlier one)."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None or path == "-":
            continue
        real = Path(path).resolve()
        if real in seen:
            raise UserError(f"{seen[real]} and {flag} name the same file ({path}); give each its own path")
        seen[real] = flag


def _write_trace(args, model, method, tokenizer, params, prompt_ids, first_ids: list[int]) -> None:
    """Re-draw batch 0 (``sample_batches``' arguments and seed) with tracing on; write sample 0's page."""
    from esolm.evaluation.samples import DEFAULT_BATCH_SIZE
    from esolm.sampling.api import generate
    from esolm.sampling.params import batch_seed
    from esolm.serving.trace import events_from_generation, write_trace_html

    n = min(args.num_samples, args.batch_size or DEFAULT_BATCH_SIZE)
    out = generate(model, method, num_samples=n, batch_size=n, params=params.replace(seed=batch_seed(params.seed, 0)),
                   prompt_ids=prompt_ids, max_length=args.max_length,
                   eos_id=tokenizer.eos_id if args.stop_at_eos else None, bos_id=tokenizer.bos_id, trace=True)
    if out.sequences()[0] != first_ids:
        raise RuntimeError("the traced re-draw of the first sample differs from the written one")
    events = events_from_generation(out, tokenizer, model=str(args.model))
    write_trace_html(args.trace_html, events, title=f"esolm decoding trace: {args.model}")
