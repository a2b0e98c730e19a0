"""Decoding speed of two esolm source trees, alternating in one run: the decoding-core refactor's speed check.

For each round, each tree (order swapped every round, so drifting load hits both alike) runs

* ``esolm bench latency`` — every method, ``--lengths L``, batch 1, one CPU thread;
* ``benchmarks/engine_throughput.py MODEL`` — the serving engine alone, ``--batches B,1``, one thread,

each in a fresh interpreter with ``PYTHONPATH=TREE/src``. Reports the best time per (tree, method) and the ratio
after / before (> 1: slower). Run it on an idle machine:

    .venv/bin/python benchmarks/core_speed.py --before ../base --after . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = "esolm-b,esolm-a,mdlm,bd3lm,ar"


def _run(tree: Path, args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([sys.executable, *args], check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)


def latency(tree: Path, length: int, repeats: int, methods: str = METHODS) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lat.json"
        _run(tree, ["-m", "esolm.cli", "bench", "latency", "--methods", methods, "--lengths", str(length),
                    "--threads", "1", "--repeats", str(repeats), "--json", str(out)])
        data = json.loads(out.read_text())
    return {r["method"]: r["seconds"] for r in data}


def engine(tree: Path, model: str, requests: int, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        _run(tree, [str(tree / "benchmarks" / "engine_throughput.py"), model, "--requests", str(requests),
                    "--batches", f"{batch},1", "--threads", "1", "--out", str(Path(tmp) / "engine")])
        data = json.loads((Path(tmp) / "engine.json").read_text())
    return {f"engine max_batch={r['max_batch']}": r["seconds"] for r in data["rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="source tree before (a checkout of the old commit)")
    ap.add_argument("--after", type=Path, default=Path("."))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1, help="latency repeats per cell inside one round")
    ap.add_argument("--methods", default=METHODS, help="bench latency's methods")
    ap.add_argument("--model", default="esolm-small", help="engine_throughput's model")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS / "core_speed")
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    best: dict[str, dict[str, float]] = {k: {} for k in trees}
    runs = []
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            t = {**latency(trees[name], args.length, args.repeats, args.methods),
                 **engine(trees[name], args.model, args.requests, args.batch)}
            runs.append({"round": r, "tree": name, "seconds": t})
            for k, v in t.items():
                best[name][k] = min(best[name].get(k, float("inf")), v)
            print(f"round {r} {name}: " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items()), flush=True)
    rows = [{"what": k, "before_s": best["before"][k], "after_s": best["after"][k],
             "ratio_after_over_before": best["after"][k] / best["before"][k]} for k in best["before"]]
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/core_speed.py " + " ".join(sys.argv[1:])
    (args.out / "core_speed.json").write_text(json.dumps({"command": command, "rounds": args.rounds,
                                                          "length": args.length, "runs": runs, "best": rows},
                                                         indent=2))
    lines = ["| what | before (s) | after (s) | after / before |", "|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['before_s']:.3f} | {r['after_s']:.3f} | {r['ratio_after_over_before']:.3f} |"
              for r in rows]
    (args.out / "core_speed.md").write_text(f"`{command}` (best of {args.rounds} alternating rounds, one thread)\n\n"
                                            + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
