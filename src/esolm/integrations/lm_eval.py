"""lm-evaluation-harness model ``esolm`` (importing this module registers it with lm-eval).

What each request type computes (every number is natural-log, float64):

* ``loglikelihood``: methods with ``exact_likelihood`` (AR: one causal pass; Eso-LM (B): the exact
  conditional ``log p(continuation | context)`` in the left-to-right order from one 2L sequential pass) use
  :func:`esolm.likelihood.exact_token_logprobs`. With ``orders=K`` (any-order models) the importance-weighted
  estimate ``log (1/K) sum_k p_k`` over K uniformly random permutations of the continuation positions (context
  first, left to right), whose expectation lower-bounds the log-likelihood of the mixture over orders and rises
  with K. The other diffusion models (MDLM / BD3-LM / Eso-LM (A)), and any diffusion model with
  ``estimator=mc``: minus the mean over ``mc_num`` draws of the objective's conditional NELBO
  (:meth:`esolm.objectives.Objective.conditional_nelbo`: context clean, only continuation tokens maskable, the
  method's ELBO weight; Eso-LM: its diffusion term at the model's alpha0 plus its sequential term; BD3-LM with
  ``ignore_bos``: position 0 never masked), a lower bound in expectation, not the likelihood. ``is_greedy`` is
  exact for the exact methods (for ``orders=K``: under the first order), and False for Monte-Carlo estimates.
  ``orders`` and ``mc_num`` are at most :data:`MAX_DRAWS`; each forward pass evaluates at most
  :data:`DRAWS_PER_PASS` of them per request, so memory does not grow with the count.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of the model length, scored as above.
* ``generate_until``: :func:`esolm.sampling.generate` after the prompt with
  ``SamplingParams.from_lm_eval(gen_kwargs, defaults)``: the task's ``temperature`` / ``top_p`` /
  ``do_sample: false`` over the model_args' ``temperature``, ``top_p``, ``seed``, ``steps``, ``alpha0``; the
  text is cut at the first stop string.

Request text is encoded with :meth:`esolm.data.tokenizers.Tokenizer.encode_text` (special-token strings such as
``<|mask|>`` are plain text); text that is not valid UTF-8, an empty request, or a bad generation option is one
UserError before any request is scored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lm_eval.models  # noqa: F401 - fills lm-eval's lazy registry first: it is filled only while it is empty
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from esolm.data.tokenizers import check_text
from esolm.devices import resolve_device
from esolm.errors import CheckpointError, UserError
from esolm.io import load_model
from esolm.io.pretrained import resolve_model
from esolm.likelihood import exact_token_logprobs, log_mean_exp
from esolm.objectives import build_objective
from esolm.sampling.params import MAX_SEED, SamplingParams, check_integer

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

MAX_DRAWS = 10_000  # most orders / Monte-Carlo draws per request: the spread is then 1% of one draw's
DRAWS_PER_PASS = 128  # orders / draws of each request evaluated by one forward pass (bounds the memory)

# model_arg -> (accepted types, description); ``None`` values mean "default".
MODEL_ARGS: dict[str, tuple[tuple[type, ...], str]] = {
    "pretrained": ((str,), "exported folder, training .ckpt, or authors' checkpoint (required)"),
    "tokenizer": ((str,), "tokenizer name or folder (default: the one saved with the model)"),
    "device": ((str,), "torch device (default cpu; lm-eval's default cuda:0 falls back to cpu without a GPU)"),
    "batch_size": ((int, str), "requests per forward pass (default 1)"),
    "max_batch_size": ((int,), "accepted for lm-eval's CLI; unused"),
    "orders": ((int,), f"Eso-LM (B): K <= {MAX_DRAWS} random orders, importance-weighted (default: exact "
                       "left-to-right)"),
    "mc_num": ((int,), f"Monte-Carlo samples per request for MDLM / BD3-LM / Eso-LM, <= {MAX_DRAWS} (default 128)"),
    "estimator": ((str,), "auto (exact for AR / Eso-LM (B), else Monte-Carlo) or mc (Monte-Carlo always)"),
    "temperature": ((float, int), "generate_until temperature when the task gives none (default 1; 0: greedy)"),
    "top_p": ((float, int), "generate_until nucleus threshold when the task gives none (default 1: off)"),
    "alpha0": ((float, int), "Eso-LM sampling alpha0 for generate_until (default: the method's)"),
    "steps": ((int,), "diffusion sampling steps for generate_until (default: the sampler's)"),
    "seed": ((int,), "seed in [0, 2**63) of orders, Monte-Carlo draws and sampling (default 0)"),
    "max_gen_toks": ((int,), "default generation budget in tokens (default 32)"),
}


def check_model_args(kwargs: dict) -> dict:
    """Validate lm-eval model_args (names and types) before any work; UserError on the first bad one."""
    unknown = sorted(set(kwargs) - set(MODEL_ARGS))
    if unknown:
        raise UserError(f"unknown esolm model_args {', '.join(unknown)} (known: {', '.join(MODEL_ARGS)})")
    out = {}
    for key, value in kwargs.items():
        if value is None:
            continue
        types, _ = MODEL_ARGS[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise UserError(f"esolm model_arg {key}={value!r} must be {' or '.join(t.__name__ for t in types)}")
        out[key] = value
    if "pretrained" not in out:
        raise UserError("esolm model_args need pretrained=PATH (an exported folder or a checkpoint)")
    bs = out.get("batch_size", 1)
    if isinstance(bs, str):
        if not bs.isdigit():
            raise UserError(f"esolm batch_size must be a positive integer, got {bs!r}")
        bs = int(bs)
    out["batch_size"] = bs
    for key in ("batch_size", "steps", "max_gen_toks"):
        if key in out:
            check_integer(out[key], f"esolm model_arg {key}", 1)
    for key in ("orders", "mc_num"):
        if key in out:
            check_integer(out[key], f"esolm model_arg {key}", 1, MAX_DRAWS)
    if "seed" in out:
        check_integer(out["seed"], "esolm model_arg seed", 0, MAX_SEED)
    sampling_defaults(out)  # the decoding values (whether they apply to the method: after loading)
    if out.get("estimator", "auto") not in ("auto", "mc"):
        raise UserError(f"esolm estimator must be auto or mc, got {out['estimator']!r}")
    try:
        resolve_model(out["pretrained"])  # load_model's own name resolution: paths, shipped names, repo ids
    except CheckpointError as e:
        raise CheckpointError(f"esolm pretrained={out['pretrained']}: {e}") from None
    return out


def sampling_defaults(args: dict) -> SamplingParams:
    """The decoding params of checked model_args (what ``generate_until`` uses where a task says nothing)."""
    try:
        return SamplingParams(temperature=args.get("temperature", 1.0), top_p=args.get("top_p"),
                              seed=args.get("seed", 0), steps=args.get("steps"), alpha0=args.get("alpha0"))
    except UserError as e:
        raise UserError(f"esolm model_args: {e}") from None


@dataclass
class _Batch:
    x: Tensor  # [B, n] context + continuation, right-padded
    valid: Tensor  # [B, n] real tokens
    score: Tensor  # [B, n] continuation tokens
    starts: list[int]  # first continuation position of each row
    lengths: list[int]


def _batch(rows: list[tuple[list[int], int]], pad: int, device) -> _Batch:
    """``rows``: (tokens, number of continuation tokens at their end)."""
    n = max(len(t) for t, _ in rows)
    x = torch.full((len(rows), n), pad, dtype=torch.long)
    valid = torch.zeros(len(rows), n, dtype=torch.bool)
    score = torch.zeros_like(valid)
    for i, (t, c) in enumerate(rows):
        x[i, :len(t)] = torch.tensor(t)
        valid[i, :len(t)] = True
        score[i, len(t) - c:len(t)] = True
    return _Batch(x.to(device), valid.to(device), score.to(device), [len(t) - c for t, c in rows],
                  [len(t) for t, _ in rows])


def _device(name: str | None) -> torch.device:
    """The device asked for; lm-eval's CLI default ``cuda:0`` falls back to the CPU when there is no GPU
    (as lm-eval's ``hf`` model does)."""
    if name in ("cuda", "cuda:0") and not torch.cuda.is_available():
        logger.warning("esolm: %s is not available, running on the CPU", name)
        return torch.device("cpu")
    return resolve_device(name or "cpu")


@register_model("esolm")
class EsoLMLM(TemplateLM):
    """An esolm model (any method, any format :func:`esolm.io.load_model` reads) as an lm-eval LM."""

    def __init__(self, **kwargs):
        super().__init__()
        args = check_model_args(kwargs)
        self._device = _device(args.get("device"))
        loaded = load_model(args["pretrained"], tokenizer=args.get("tokenizer"), require_tokenizer=True,
                            device=self._device)
        self.model, self.method, self.tok = loaded.model, loaded.method, loaded.tokenizer
        self.objective = build_objective(self.method).eval()
        self.batch_size = args["batch_size"]
        self.orders = args.get("orders")
        self.mc_num = args.get("mc_num", 128)
        self.seed = args.get("seed", 0)
        self.max_gen_toks = args.get("max_gen_toks", 32)
        self.defaults = sampling_defaults(args).resolve(self.method, self.model.config.length)
        estimator = args.get("estimator", "auto")
        if estimator == "mc" and not self.method.is_diffusion:
            raise UserError(f"estimator=mc applies to diffusion models; {self.method.label} likelihoods are exact")
        self.monte_carlo = estimator == "mc" or not self.method.exact_likelihood
        if self.orders is not None and (self.monte_carlo or not self.method.any_order):
            raise UserError(f"orders applies to Eso-LM (B) with estimator=auto only, not to {self.method.label}")
        self.generator = torch.Generator(device=self.model.device).manual_seed(self.seed)
        self.order_generator = torch.Generator().manual_seed(self.seed)

    # -- lm-eval plumbing ------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        """Most tokens (context + continuation) one request may have; AR (no mask token: a next-token pass)
        reads all but the last."""
        return self.model.config.length + (0 if self.method.is_diffusion else 1)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Plain text: special-token strings (``<|mask|>``, ``<|endoftext|>``) are encoded as text."""
        return self.tok.encode_text(string, "an lm-eval request's text")

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    # -- scoring ---------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's, after checking every request: strings of valid UTF-8, and something to score."""
        for i, req in enumerate(requests):
            context, continuation = req.args
            what = f"lm-eval loglikelihood request {i}"
            check_text(context, f"{what}'s context")
            check_text(continuation, f"{what}'s continuation")
            if context == "" and not self.tok_encode(continuation):
                raise UserError(f"{what} has an empty context and a continuation of no tokens "
                                f"({continuation!r}): nothing to score")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, ctx, cont in requests:
            ctx = list(ctx) or [self.prefix_token_id]  # a context of no tokens is conditioned on the BOS
            whole = (ctx + list(cont))[-self.max_length:]
            rows.append((whole, min(len(cont), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        with torch.no_grad():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                b = _batch([rows[i] for i in idx], self.tok.pad_id, self.model.device)
                for i, res in zip(idx, self._score(b), strict=True):
                    out[i] = res
        return out

    def _score(self, b: _Batch) -> list[tuple[float, bool]]:
        if self.monte_carlo:
            return [(-float(v), False) for v in self._mc_nelbo(b)]
        if self.orders is None:
            tok_ll, best = exact_token_logprobs(self.model, self.method, b.x, b.valid)
            ll, greedy = (tok_ll * b.score).sum(1), (best | ~b.score).all(1)
        else:
            ll, greedy = self._iw(b)
        return [(float(v), bool(g)) for v, g in zip(ll, greedy, strict=True)]

    def _iw(self, b: _Batch) -> tuple[Tensor, Tensor]:
        """K orders per row: context left to right, then a uniform permutation of the continuation;
        :data:`DRAWS_PER_PASS` orders of every row per forward pass."""
        rows, n = b.x.shape
        sums, greedy = [], None
        for first in range(0, self.orders, DRAWS_PER_PASS):
            k = min(DRAWS_PER_PASS, self.orders - first)
            orders = torch.arange(n).repeat(k * rows, 1)
            for r in range(k * rows):
                lo, hi = b.starts[r % rows], b.lengths[r % rows]
                orders[r, lo:hi] = lo + torch.randperm(hi - lo, generator=self.order_generator)
            x, valid, score = b.x.repeat(k, 1), b.valid.repeat(k, 1), b.score.repeat(k, 1)
            tok_ll, best = exact_token_logprobs(self.model, self.method, x, valid, orders.to(x.device))
            sums.append((tok_ll * score).sum(1).view(k, rows))  # continuation steps are the same in every order
            if greedy is None:
                greedy = (best | ~score).all(1)[:rows]
        return log_mean_exp(torch.cat(sums), 0), greedy

    def _mc_nelbo(self, b: _Batch) -> Tensor:
        """Mean over ``mc_num`` draws of the conditional NELBO of the continuation, float64 ``[B]``; the draws of
        a pass are tiled (row ``j * B + r``), so each request's times are stratified."""
        rows = b.x.shape[0]
        total = torch.zeros(rows, dtype=torch.float64, device=b.x.device)
        for first in range(0, self.mc_num, DRAWS_PER_PASS):
            m = min(DRAWS_PER_PASS, self.mc_num - first)
            x, valid, maskable = (t.repeat(m, 1) for t in (b.x, b.valid, b.score))
            nelbo = self.objective.conditional_nelbo(self.model, x, valid, maskable, self.generator)
            total += nelbo.view(m, rows).sum(0)
        return total / self.mc_num

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length - 1, 1)):
                windows.append(((None, None), ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += ll
        return totals

    # -- generation ------------------------------------------------------------------------------------
    def _generation(self, i: int, context, gen_kwargs) -> tuple[list[int], int, SamplingParams, list[str]]:
        """One checked generate_until request: (prompt ids, token budget, params, stop strings)."""
        what = f"lm-eval generate_until request {i}"
        if not isinstance(gen_kwargs, dict):
            raise UserError(f"{what}: generation options must be a dict, got {type(gen_kwargs).__name__}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else until
        if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise UserError(f"{what}: until must be a string or a list of strings, got {until!r}")
        try:
            params = SamplingParams.from_lm_eval(gen_kwargs, self.defaults)
            budget = check_integer(gen_kwargs.get("max_gen_toks", self.max_gen_toks), "max_gen_toks", 1)
        except UserError as e:
            raise UserError(f"{what}: {e}") from None
        length = self.model.config.length
        budget = min(budget, length - 1)
        check_text(context, f"{what}'s context")
        prompt = self.tok_encode(context)[-(length - budget):] or [self.prefix_token_id]
        return prompt, budget, params, list(until)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from esolm.sampling import generate

        jobs = [self._generation(i, *req.args) for i, req in enumerate(requests)]  # every request checked first
        out = []
        for prompt, budget, params, until in jobs:
            res = generate(self.model, self.method, prompt_ids=[prompt], params=params,
                           max_length=len(prompt) + budget, eos_id=self.tok.eos_id)
            text = self.tok.decode(res.tokens[0, len(prompt):].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out
