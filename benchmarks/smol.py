"""esolm-smol (SmolLM2-135M adapted into an Eso-LM (B)): likelihoods, samples, self-speculative decoding.

    python benchmarks/smol.py --model esolm-smol --out benchmarks/results/smol            # everything
    python benchmarks/smol.py --model runs/smol/model --sections nll iw --sequences 16

Sections (``--sections``, default all):

* ``nll`` — held-out NLL per token (the adapt run's validation split of the embedded wiki corpus, packed
  ``--length`` tokens, position 0 given): SmolLM2's own AR NLL (esolm's exact likelihood at alpha0 = 0, checked
  against ``transformers`` on the same GGUF), and the Eso-LM (B) NELBO at each ``--alpha0`` (both terms on every
  sequence, ``--draws`` Monte-Carlo draws), for the adapted model and the not-fine-tuned one (the base with a
  mask row: zero deltas);
* ``iw`` — the importance-weighted bound over generation orders at ``--iw-alpha0`` for K = 1, 4, 16, 64 (nested: the
  first K of the same 64 orders), both models;
* ``speculative`` — wall-clock decoding on one thread, batch 1, ``--new-tokens`` tokens after a ``--prompt-tokens``
  prompt, for each of ``--prompts`` held-out prompts, sampled at temperature 1 (the same law for all: SmolLM2's)
  and greedy: AR with a KV cache (esolm's AR decoder on the same weights: SmolLM2 itself), Eso-LM (B) at alpha0 = 0
  (one row per sequential step), and self-speculative decoding (``--drafts``, plus adaptive); NFE per token,
  acceptance by draft depth, tokens/s, and the sequential-step cost ratio Eso / AR;
* ``samples`` — texts at several alpha0 for a fixed prompt (for reading; some go in the model card).

Timings are only meaningful on an idle machine. Writes ``OUT/smol.json`` and ``OUT/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from esolm.data.datasets import build_datasets
from esolm.io import load_model
from esolm.io.llama import load_base, smollm2_gguf_path
from esolm.likelihood import anyorder_loglik, log_mean_exp, order_token_logprobs
from esolm.methods import default_batch_split
from esolm.model.shift import start_first
from esolm.objectives import build_objective
from esolm.orders import sample_orders
from esolm.sampling.api import free_positions, generate, prepare
from esolm.sampling.params import SamplingParams
from esolm.sampling.speculative import sample_speculative

try:
    from _runs import log, write_json
except ImportError:  # run as a module
    from benchmarks._runs import log, write_json


def heldout(tokenizer, length: int, n: int, val_fraction: float, split_seed: int) -> torch.Tensor:
    """The first ``n`` full validation sequences of the embedded wiki corpus (the adapt run's split)."""
    splits = build_datasets("wiki", tokenizer, length, "pack", val_fraction, split_seed)
    rows = [splits.validation[i]["input_ids"] for i in range(len(splits.validation))
            if bool(splits.validation[i]["valid"].all())]
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} full validation sequences of length {length}")
    return torch.stack([torch.as_tensor(r) for r in rows[:n]]).long()


@torch.no_grad()
def ar_nll(model, x: torch.Tensor) -> float:
    order = torch.arange(x.shape[1]).expand_as(x)
    ll = order_token_logprobs(model, x, order)
    return float(-ll[:, 1:].sum() / ll[:, 1:].numel())


@torch.no_grad()
def hf_nll(x: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=str(gguf)).eval()
    logp = torch.log_softmax(hf(x).logits.double(), -1)[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
    return float(-logp.mean())


@torch.no_grad()
def nelbo(model, x: torch.Tensor, alpha0: float, draws: int, seed: int) -> dict:
    """Per-token Eso-LM (B) NELBO: both terms on every sequence (``Objective.conditional_nelbo``'s terms), the mean
    of ``draws`` draws, with its standard error over sequences."""
    method = {"name": "esolm", "variant": "B", "alpha0": alpha0, "batch_split": default_batch_split(alpha0)}
    obj = build_objective(method).eval()
    maskable = torch.ones_like(x, dtype=torch.bool)
    maskable[:, 0] = False
    per_seq = torch.zeros(x.shape[0], dtype=torch.float64)
    for d in range(draws):
        g = torch.Generator().manual_seed(seed + d)
        per_seq += obj.conditional(model, x, None, maskable, g, torch.Generator().manual_seed(seed + 1000 + d))
    per_tok = per_seq / draws / (x.shape[1] - 1)
    return {"nelbo": float(per_tok.mean()), "se": float(per_tok.std() / math.sqrt(len(per_tok)))}


@torch.no_grad()
def iw(model, x: torch.Tensor, alpha0: float, ks: list[int], seed: int) -> dict:
    """The IW bound (nats/token) for each K in ``ks``: the first K of ``max(ks)`` orders per sequence."""
    g = torch.Generator().manual_seed(seed)
    kmax = max(ks)
    ll = torch.empty(kmax, x.shape[0], dtype=torch.float64)
    for k in range(kmax):
        order = start_first(sample_orders(x.shape[0], x.shape[1], alpha0, g))
        ll[k] = anyorder_loglik(model, x, order)
    n = x.shape[1] - 1
    return {str(k): float(-log_mean_exp(ll[:k], 0).mean() / n) for k in ks}


def decode(model, prompt: list[int], new: int, params: SamplingParams, method: dict, eos_id=None) -> dict:
    """One request, batch 1: tokens, NFE, seconds (and the speculative acceptance counts)."""
    length = len(prompt) + new
    if params.speculative is None:
        out = generate(model, method, prompt_ids=[prompt], params=params, max_length=length)
        return {"tokens": out.tokens[0, len(prompt):].tolist(), "nfe": out.nfe, "seconds": out.seconds}
    req = prepare(model, method, params, prompt_ids=[prompt], max_length=length)
    free = free_positions(req.tokens, model.config.mask_id, req.prompt_len)
    plan = req.decoder.plan(free, req.prompt_len, req.params, torch.Generator().manual_seed(req.params.seed))
    p = req.params
    out = sample_speculative(model, req.tokens, plan, k=p.speculative, adaptive=p.draft == "adaptive",
                             generator=torch.Generator().manual_seed(p.seed), greedy=p.greedy,
                             temperature=p.draw_temperature, top_p=p.top_p)
    return {"tokens": out.tokens[0, len(prompt):].tolist(), "nfe": out.nfe, "seconds": out.seconds,
            "depth_proposed": out.depth_proposed.tolist(), "depth_accepted": out.depth_accepted.tolist()}


def speculative(model, prompts: list[list[int]], new: int, drafts: list[int], rounds: int) -> dict:
    torch.set_num_threads(1)
    eso = {"name": "esolm", "variant": "B", "alpha0": 0.0}
    ar = {"name": "ar"}
    configs = {"ar": (ar, {})}
    configs["esolm_b_alpha0_0"] = (eso, {"alpha0": 0.0})
    for k in drafts:
        configs[f"speculative_k{k}"] = (eso, {"alpha0": 0.0, "speculative": k})
    configs[f"speculative_adaptive_k{drafts[0]}"] = (eso, {"alpha0": 0.0, "speculative": drafts[0],
                                                          "draft": "adaptive"})
    decode(model, prompts[0], 8, SamplingParams(temperature=0), ar)  # warm-up
    out = {}
    for law, temp in (("sampled", 1.0), ("greedy", 0.0)):
        res = {name: {"seconds": 0.0, "nfe": 0, "tokens": 0, "proposed": [], "accepted": []} for name in configs}
        texts = {name: [] for name in configs}
        for r in range(rounds):
            for i, prompt in enumerate(prompts):
                for name, (method, kw) in configs.items():  # interleaved: drift hits every method alike
                    params = SamplingParams(temperature=temp, seed=1000 * r + i, **kw)
                    d = decode(model, prompt, new, params, method)
                    s = res[name]
                    s["seconds"] += d["seconds"]
                    s["nfe"] += d["nfe"]
                    s["tokens"] += new
                    if "depth_proposed" in d:
                        s["proposed"] = [a + b for a, b in zip(s["proposed"] or [0] * len(d["depth_proposed"]),
                                                               d["depth_proposed"])]
                        s["accepted"] = [a + b for a, b in zip(s["accepted"] or [0] * len(d["depth_accepted"]),
                                                               d["depth_accepted"])]
                    if r == 0:
                        texts[name].append(d["tokens"])
        base = res["ar"]["tokens"] / res["ar"]["seconds"]
        for s in res.values():
            s["tokens_per_s"] = s["tokens"] / s["seconds"]
            s["speedup_vs_ar"] = s["tokens_per_s"] / base
            s["nfe_per_token"] = s["nfe"] / s["tokens"]
            s["seconds_per_call"] = s["seconds"] / s["nfe"]
            if s["proposed"]:
                s["acceptance_by_depth"] = [a / p if p else None for a, p in zip(s["accepted"], s["proposed"])]
        if temp == 0.0:  # greedy: every method must give the same tokens (the same law, deterministic)
            res["identical_greedy_tokens"] = all(texts[n] == texts["ar"] for n in texts)
        res["seq_step_cost_eso_over_ar"] = res["esolm_b_alpha0_0"]["seconds_per_call"] / res["ar"]["seconds_per_call"]
        out[law] = res
    return out


def samples(model, tokenizer, prompt: str, alphas: list[float], new: int, seed: int) -> dict:
    ids = tokenizer.encode_prompt(prompt, model.config.length)
    eso = {"name": "esolm", "variant": "B", "alpha0": 0.0}
    out = {}
    for a in alphas:
        res = generate(model, eso, 2, prompt_ids=[ids], params=SamplingParams(alpha0=a, seed=seed, temperature=1.0),
                       max_length=len(ids) + new)
        out[str(a)] = {"nfe": res.nfe, "texts": [prompt + tokenizer.decode(r[len(ids):]) for r in res.sequences()]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="esolm-smol", help="the adapted model (a name or folder)")
    ap.add_argument("--out", default="benchmarks/results/smol")
    ap.add_argument("--sections", nargs="+", default=["nll", "iw", "speculative", "samples"])
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--alpha0", type=float, nargs="+", default=[0.0, 0.125, 0.25, 0.5, 1.0])
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--iw-alpha0", type=float, default=0.25)
    ap.add_argument("--iw-sequences", type=int, default=4)
    ap.add_argument("--iw-k", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--drafts", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="threads for the likelihood sections (timing: 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "smol.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    loaded = load_model(args.model)
    model, tok = loaded.model.eval(), loaded.tokenizer
    result["model"] = {"name": str(args.model), "config": model.config.to_dict(), "provenance": loaded.provenance}
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "torch": torch.__version__}
    x = heldout(tok, args.length, max(args.sequences, args.iw_sequences, args.prompts), 0.02, 0)
    untrained = load_base(smollm2_gguf_path(), dtype=torch.float32, length=model.config.length).eval()
    models = {"adapted": model, "not_fine_tuned": untrained}
    t0 = time.perf_counter()
    if "nll" in args.sections:
        xs = x[:args.sequences]
        sec = {"sequences": len(xs), "length": args.length, "tokens_scored": len(xs) * (args.length - 1),
               "smollm2_ar_nll": ar_nll(untrained, xs), "smollm2_ar_nll_transformers": hf_nll(xs),
               "adapted_ar_nll": ar_nll(model, xs), "draws": args.draws, "nelbo": {}}
        for name, m in models.items():
            sec["nelbo"][name] = {}
            for a in args.alpha0:
                sec["nelbo"][name][str(a)] = nelbo(m, xs, a, args.draws, args.seed)
                log(f"nll {name} alpha0={a}: {sec['nelbo'][name][str(a)]}")
        result["nll"] = sec
        write_json(path, result)
    if "iw" in args.sections:
        xs = x[:args.iw_sequences]
        result["iw"] = {"alpha0": args.iw_alpha0, "sequences": len(xs), "length": args.length,
                        "bounds": {name: iw(m, xs, args.iw_alpha0, args.iw_k, args.seed)
                                   for name, m in models.items()},
                        "smollm2_ar_nll": ar_nll(untrained, xs)}
        log(f"iw: {result['iw']}")
        write_json(path, result)
    if "samples" in args.sections:
        result["samples"] = samples(model, tok, "The history of France", [0.0, 0.25, 0.5, 1.0], 40, args.seed)
        write_json(path, result)
    if "speculative" in args.sections:
        prompts = [x[i, :args.prompt_tokens].tolist() for i in range(args.prompts)]
        result["speculative"] = {"prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
                                 "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": 1,
                                 **speculative(model, prompts, args.new_tokens, args.drafts, args.rounds)}
        write_json(path, result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(path, result)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
