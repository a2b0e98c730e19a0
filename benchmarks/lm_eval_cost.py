"""Cost and variance of lm-eval log-likelihoods: exact (one 2L pass) vs the Monte-Carlo NELBO.

On one Eso-LM (B) model, scores the ``esolm_wiki_choice`` task's requests (context, each of 4
continuations) with the exact left-to-right conditional and with ``estimator=mc`` for each ``mc_num``,
and reports seconds per request, the standard deviation of the log-likelihood estimate over seeds
(per request, averaged over requests) and the multiple-choice accuracy (averaged over seeds)::

    python benchmarks/lm_eval_cost.py runs/tiny/export --docs 32 --seeds 3 --out benchmarks/results/lm_eval_cost.md
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from lm_eval.api.instance import Instance

from esolm.integrations.lm_eval import EsoLMLM
from esolm.integrations.lm_eval_tasks.utils import wiki_choice


def requests(num_docs: int) -> tuple[list[Instance], list[int]]:
    docs = wiki_choice(num_docs=num_docs)["test"]
    reqs = [Instance("loglikelihood", d, (d["context"], " " + c), i)
            for d in docs for i, c in enumerate(d["choices"])]
    return reqs, [d["label"] for d in docs]


def score(lm: EsoLMLM, reqs: list[Instance]) -> tuple[torch.Tensor, float]:
    """Log-likelihoods ``[docs, 4]`` and seconds per request."""
    t0 = time.perf_counter()
    lls = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    return torch.tensor(lls, dtype=torch.float64).view(-1, 4), (time.perf_counter() - t0) / len(reqs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="an Eso-LM (B) model: exported folder or checkpoint")
    p.add_argument("--docs", type=int, default=32, help="multiple-choice documents (4 requests each)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per Monte-Carlo setting")
    p.add_argument("--mc", default="1,8,32,128", help="comma-separated mc_num values")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    reqs, labels = requests(args.docs)
    labels = torch.tensor(labels)
    rows = []
    settings = [("exact (left-to-right, 1 pass)", {}, 1)]
    settings += [(f"Monte-Carlo NELBO, mc_num={m}", {"estimator": "mc", "mc_num": m}, args.seeds)
                 for m in map(int, args.mc.split(","))]
    for name, kw, seeds in settings:
        runs = [score(EsoLMLM(pretrained=args.model, batch_size=args.batch_size, seed=s, **kw), reqs)
                for s in range(seeds)]
        lls = torch.stack([r[0] for r in runs])  # [seeds, docs, 4]
        sec = sum(r[1] for r in runs) / seeds
        std = float(lls.std(0).mean()) if seeds > 1 else 0.0
        acc = float((lls.argmax(-1) == labels).double().mean())
        rows.append(f"| {name} | {sec * 1e3:.1f} | {std:.3f} | {acc:.3f} | {float(lls.mean()):.2f} |")
        print(rows[-1], flush=True)
    table = "\n".join(["| estimator | ms / request | std of log-lik over seeds (nats) | accuracy | mean log-lik |",
                       "|---|---|---|---|---|", *rows])
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
