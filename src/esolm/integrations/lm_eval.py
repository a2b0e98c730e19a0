"""lm-evaluation-harness model ``esolm`` (importing this module registers it with lm-eval).

What each request type computes (every number is natural-log, float64):

* ``loglikelihood``: AR — exact, one causal pass. Eso-LM (B) — exact conditional
  ``log p(continuation | context)`` in the left-to-right order from one 2L sequential pass; with
  ``orders=K`` the importance-weighted estimate ``log (1/K) sum_k p_k`` over K uniformly random
  permutations of the continuation positions (context first, left to right), whose expectation
  lower-bounds the log-likelihood of the mixture over orders and rises with K. MDLM / BD3-LM /
  Eso-LM (A), and Eso-LM (B) with ``estimator=mc`` — minus a Monte-Carlo conditional NELBO with
  ``mc_num`` samples (context clean, only continuation tokens maskable, the method's ELBO weight; for
  Eso-LM its diffusion term at the model's alpha0 plus its sequential term): a lower bound in
  expectation, not the likelihood. ``is_greedy`` is exact for AR and Eso-LM (B) (for ``orders=K``:
  under the first order), and False for Monte-Carlo estimates.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of the model length, scored as above.
* ``generate_until``: :func:`esolm.sampling.generate` after the prompt (greedy tokens when the task asks
  for ``do_sample: false`` or ``temperature: 0``), cut at the first stop string.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from esolm.devices import resolve_device
from esolm.errors import CheckpointError, UserError
from esolm.io import load_model
from esolm.io.pretrained import resolve_model
from esolm.likelihood import log_mean_exp, order_token_logprobs
from esolm.methods import check_alpha0
from esolm.model import masks
from esolm.noise import LogLinearSchedule, antithetic_times, uniform
from esolm.objectives import hide_padding, token_nll
from esolm.orders import sort_clean_first

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

# model_arg -> (accepted types, description); ``None`` values mean "default".
MODEL_ARGS: dict[str, tuple[tuple[type, ...], str]] = {
    "pretrained": ((str,), "exported folder, training .ckpt, or authors' checkpoint (required)"),
    "tokenizer": ((str,), "tokenizer name or folder (default: the one saved with the model)"),
    "device": ((str,), "torch device (default cpu; lm-eval's default cuda:0 falls back to cpu without a GPU)"),
    "batch_size": ((int, str), "requests per forward pass (default 1)"),
    "max_batch_size": ((int,), "accepted for lm-eval's CLI; unused"),
    "orders": ((int,), "Eso-LM (B): K random orders, importance-weighted (default: exact left-to-right)"),
    "mc_num": ((int,), "Monte-Carlo samples per request for MDLM / BD3-LM / Eso-LM (default 128)"),
    "estimator": ((str,), "auto (exact for AR / Eso-LM (B), else Monte-Carlo) or mc (Monte-Carlo always)"),
    "alpha0": ((float, int), "Eso-LM sampling alpha0 for generate_until (default: the method's)"),
    "steps": ((int,), "diffusion sampling steps for generate_until (default: the sampler's)"),
    "seed": ((int,), "seed of orders, Monte-Carlo draws and sampling (default 0)"),
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
    for key in ("batch_size", "orders", "mc_num", "steps", "max_gen_toks"):
        if key in out and out[key] < 1:
            raise UserError(f"esolm model_arg {key} must be >= 1, got {out[key]}")
    if "alpha0" in out:
        out["alpha0"] = check_alpha0(out["alpha0"])
    if out.get("estimator", "auto") not in ("auto", "mc"):
        raise UserError(f"esolm estimator must be auto or mc, got {out['estimator']!r}")
    try:
        resolve_model(out["pretrained"])  # load_model's own name resolution: paths, shipped names, repo ids
    except CheckpointError as e:
        raise CheckpointError(f"esolm pretrained={out['pretrained']}: {e}") from None
    return out


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
        self.batch_size = args["batch_size"]
        self.orders = args.get("orders")
        self.mc_num = args.get("mc_num", 128)
        self.alpha0 = args.get("alpha0")
        self.steps = args.get("steps")
        self.seed = args.get("seed", 0)
        self.max_gen_toks = args.get("max_gen_toks", 32)
        self.monte_carlo = args.get("estimator") == "mc" or self.method.name in ("mdlm", "bd3lm") or (
            self.method.name == "esolm" and self.method.variant == "A")
        if self.monte_carlo and self.method.name == "ar":
            raise UserError("estimator=mc applies to diffusion models; AR likelihoods are exact")
        if self.alpha0 is not None and self.method.name != "esolm":
            raise UserError(f"alpha0 applies to Eso-LM only, not to {self.method.name}")
        if self.orders is not None and (self.monte_carlo or self.method.name != "esolm"):
            raise UserError(f"orders applies to Eso-LM (B) with estimator=auto only, not to {self.method}")
        self.generator = torch.Generator(device=self.model.device).manual_seed(self.seed)
        self.order_generator = torch.Generator().manual_seed(self.seed)

    # -- lm-eval plumbing ------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        """Most tokens (context + continuation) one request may have; AR reads all but the last."""
        return self.model.config.length + (1 if self.method.name == "ar" else 0)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    # -- scoring ---------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, ctx, cont in requests:
            whole = (list(ctx) + list(cont))[-self.max_length:]
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
        if self.method.name == "ar":
            ll, greedy = self._ar(b)
        elif self.orders is None:
            n = b.x.shape[1]
            order = torch.arange(n, device=b.x.device).expand_as(b.x)
            tok_ll, best = order_token_logprobs(self.model, b.x, order, b.valid, with_greedy=True)
            ll = (tok_ll * b.score).sum(1)
            greedy = (best | ~b.score).all(1)
        else:
            ll, greedy = self._iw(b)
        return [(float(v), bool(g)) for v, g in zip(ll, greedy, strict=True)]

    def _ar(self, b: _Batch) -> tuple[Tensor, Tensor]:
        inp, tgt = b.x[:, :-1], b.x[:, 1:]
        mask = hide_padding(masks.causal(inp.shape[1], inp.device), b.valid[:, :-1])
        logits = self.model(inp, mask=mask)
        score = b.score[:, 1:]
        ll = (-token_nll(logits, tgt, self.model.config.mask_id).double() * score).sum(1)
        return ll, (logits.argmax(-1) == tgt).logical_or(~score).all(1)

    def _iw(self, b: _Batch) -> tuple[Tensor, Tensor]:
        """K orders per row: context left to right, then a uniform permutation of the continuation."""
        k, (rows, n) = self.orders, b.x.shape
        orders = torch.arange(n).repeat(k * rows, 1)
        for r in range(k * rows):
            lo, hi = b.starts[r % rows], b.lengths[r % rows]
            perm = torch.randperm(hi - lo, generator=self.order_generator)
            orders[r, lo:hi] = lo + perm
        orders = orders.to(b.x.device)
        x, valid = b.x.repeat(k, 1), b.valid.repeat(k, 1)
        tok_ll, best = order_token_logprobs(self.model, x, orders, valid, with_greedy=True)
        score = b.score.repeat(k, 1)  # continuation positions are the same steps in every order
        ll = log_mean_exp((tok_ll * score).sum(1).view(k, rows), 0)
        return ll, (best | ~score).all(1)[:rows]

    def _mc_nelbo(self, b: _Batch) -> Tensor:
        """Mean over ``mc_num`` draws of the conditional NELBO of the continuation, float64 ``[B]``."""
        m, rows = self.mc_num, b.x.shape[0]
        x, valid, can_mask = (t.repeat_interleave(m, 0) for t in (b.x, b.valid, b.score))
        t = torch.cat([antithetic_times(m, self.generator, device=x.device) for _ in range(rows)])
        name = self.method.name
        if name == "mdlm":
            nll = self._diffusion(x, valid, can_mask, t, LogLinearSchedule(1.0), "bidirectional")
        elif name == "bd3lm":
            nll = self._block_diffusion(x, valid, can_mask)
        else:  # Eso-LM: diffusion term at the model's alpha0 plus the sequential term
            a0, variant = self.method.alpha0, self.method.variant
            attention = "causal" if variant == "B" else "prefix"
            nll = (self._diffusion(x, valid, can_mask, t, LogLinearSchedule(a0), attention)
                   + self._sequential(x, valid, can_mask, a0, variant))
        return nll.view(rows, m).mean(1)

    def _diffusion(self, x, valid, can_mask, t, schedule: LogLinearSchedule, attention: str) -> Tensor:
        n = x.shape[1]
        mask_id = self.model.config.mask_id
        is_mask = (uniform(x.shape, self.generator, x.device) < schedule.mask_prob(t)[:, None]) & can_mask
        xt = torch.where(is_mask, torch.full_like(x, mask_id), x)
        if attention == "bidirectional":
            logits = self.model(xt, mask=hide_padding(None, valid))
            nll = token_nll(logits, x, mask_id).double() * is_mask
        else:
            idx = sort_clean_first(is_mask, self.generator)
            attn = (masks.causal(n, x.device) if attention == "causal"
                    else masks.prefix_lm((~is_mask).sum(1), n, x.device))
            attn = hide_padding(attn, valid.gather(1, idx))
            logits = self.model(xt.gather(1, idx), positions=idx, mask=attn)
            nll = token_nll(logits, x.gather(1, idx), mask_id).double() * is_mask.gather(1, idx)
        return nll.sum(1) * -schedule.weight(t).double()

    def _sequential(self, x, valid, can_mask, alpha0: float, variant: str) -> Tensor:
        n = x.shape[1]
        mask_id = self.model.config.mask_id
        is_mask = (uniform(x.shape, self.generator, x.device) < (1.0 - alpha0)) & can_mask
        z0 = torch.where(is_mask, torch.full_like(x, mask_id), x)
        idx = sort_clean_first(is_mask, self.generator, shuffle_clean=variant == "B", shuffle_masks=False)
        vs = valid.gather(1, idx)
        attn = (masks.sequential(n, x.device) if variant == "B"
                else masks.sequential_prefix((~is_mask).sum(1), n, x.device))
        attn = hide_padding(attn, torch.cat([vs, vs], 1))
        x_s = x.gather(1, idx)
        logits = self.model(torch.cat([z0.gather(1, idx), x_s], 1), positions=torch.cat([idx, idx], 1),
                            mask=attn, logits_slice=slice(0, n))
        return (token_nll(logits, x_s, mask_id).double() * is_mask.gather(1, idx)).sum(1)

    def _block_diffusion(self, x, valid, can_mask) -> Tensor:
        bs = self.method.block_size
        n = math.ceil(x.shape[1] / bs) * bs
        if n > self.model.config.length:
            raise UserError(f"bd3lm: {x.shape[1]} tokens padded to blocks of {bs} exceed the model length")
        pad = n - x.shape[1]
        x = torch.nn.functional.pad(x, (0, pad), value=self.tok.pad_id)
        valid, can_mask = (torch.nn.functional.pad(v, (0, pad), value=False) for v in (valid, can_mask))
        rows, nb = x.shape[0], n // bs
        sched = LogLinearSchedule(1.0)
        t = antithetic_times(rows * nb, self.generator, device=x.device).view(rows, nb)
        rate = sched.mask_prob(t).repeat_interleave(bs, 1)
        coef = -sched.weight(t).double().repeat_interleave(bs, 1)
        mask_id = self.model.config.mask_id
        is_mask = (uniform(x.shape, self.generator, x.device) < rate) & can_mask
        xt = torch.where(is_mask, torch.full_like(x, mask_id), x)
        pos = torch.arange(n, device=x.device).expand(rows, n)
        attn = hide_padding(masks.block_diffusion(n, bs, x.device), torch.cat([valid, valid], 1))
        logits = self.model(torch.cat([xt, x], 1), positions=torch.cat([pos, pos], 1), mask=attn,
                            logits_slice=slice(0, n))
        return (token_nll(logits, x, mask_id).double() * is_mask * coef).sum(1)

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
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from esolm.sampling import generate

        out = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = min(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), self.model.config.length - 1)
            prompt = self.tok_encode(context)[-(self.model.config.length - budget):] or [self.prefix_token_id]
            greedy = gen_kwargs.get("do_sample") is False or gen_kwargs.get("temperature") == 0
            res = generate(self.model, self.method, prompt_ids=[prompt], steps=self.steps, alpha0=self.alpha0,
                           seed=self.seed, max_length=len(prompt) + budget, eos_id=self.tok.eos_id, greedy=greedy)
            text = self.tok.decode(res.tokens[0, len(prompt):].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out
