"""Continuous batching: many completion requests, one network call per engine step.

**Eso-LM (B) and AR are batched** (``method.batchable``). Every admitted request owns a row: its own
:class:`~esolm.sampling.schedule.Plan` (built by the method's decoder, :func:`esolm.sampling.decoders.decoder_for`,
exactly as :func:`~esolm.sampling.api.generate` builds it for one sample, from a plan generator seeded with the
request's seed; AR's is the left-to-right plan), its own draw generator (seeded likewise),
its own cache length. A step feeds, per row, what the one-sample sampler would feed at that row's next
step — Eso-LM (B): ``[tokens decoded at its previous step ; masks of this step]`` in sorted order
(:mod:`esolm.sampling.esolm`); AR: the tokens not yet cached (:mod:`esolm.sampling.ar`) — right-aligned
and padded to the longest row, in ONE network call.
Rows join (admission) and leave (done, EOS, cancelled, failed) between steps.

The cache is :class:`SlotKV`: keys/values preallocated for ``max_batch`` rows of the model length, row ``b``
slot ``j`` holding the token at sorted index ``j`` (position ``j`` for AR). A call writes its valid new
tokens into their slots first and then attends over the slots: query ``u`` of row ``b`` sees slots
``<= slot(b, u)`` (``masks.slot_causal``), i.e. the row's cache and its new tokens causally, as in the
one-sample call. The masks' slots are overwritten by the next step, as :class:`~esolm.model.attention.
KVCache` does. Active rows are kept in slots ``0..B-1`` (a leaving row's slot gets the last row's
cache), so a call reads a view of the storage, never a copy. The model's frozen conditioning
(:meth:`~esolm.model.backbone.DiT.frozen_conditioning`; Eso-LM conditions on sigma = 0, the same for every
row) is computed once, when the engine is built, so the weights must not change while it serves.
All rows draw in one :func:`esolm.sampling.draw.draw_segments` call, each from its own generator on its own
logits exactly as :func:`~esolm.sampling.draw.draw` would, so its tokens equal those of ``generate`` alone
with the same arguments (the batched call's logits differ from the lone call's only by floating-point
rounding).

**Eso-LM (A), MDLM and BD3-LM are served one request at a time**: a step runs a whole request through
:func:`~esolm.sampling.api.generate` and emits its per-call events from the typed trace
(:class:`~esolm.sampling.common.Step`) afterwards (cancel applies to queued requests only). Their caches are
not batchable as they are: Eso-LM (A)'s diffusion phase and MDLM recompute every key at every step, and
BD3-LM's in-block ancestral steps decide a different number of positions per row.

**Log-probabilities.** A batched request with ``logprobs`` (a count ``k``) gets, at the step that drew each of its
tokens, the token's exact log-probability under the law it was drawn from
(:func:`esolm.sampling.draw.sampling_logits` of that step's logits: temperature, then nucleus; a greedy request
reports the model's own law, temperature 1 without nucleus, under which its token is the most likely) and the
``k`` most likely tokens of that law (:class:`StepEvent` and :class:`Finished` carry them). Only the rows that
asked compute a ``log_softmax``, so the step costs the same when no one asks. The one-at-a-time methods refuse
``logprobs`` (their samplers' laws are not one softmax per token: MDLM and BD3-LM also draw which positions
stay masked). :meth:`Engine.score` gives a prompt's exact left-to-right conditionals
(:func:`esolm.likelihood.exact_logits`: one pass; AR and Eso-LM (B)), between steps.

Requests are checked by :func:`esolm.sampling.api.prepare`, the check of ``generate`` itself, and decode with
the same :class:`~esolm.sampling.params.SamplingParams`. With ``eos_id``, ``Finished.tokens`` are cut by
:func:`~esolm.sampling.api.cut_at_eos` as ``generate`` cuts them, and a row leaves as soon as such an EOS
precedes every position it has not decoded (AR: at its EOS). Requests whose prompt is empty on a model that
needs a first token (AR, BD3-LM with ``ignore_bos``) start from ``[bos_id]`` (else ``[eos_id]``):
:meth:`Engine.check` puts it in the prompt.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from esolm.errors import ConfigError, EsoLMError, UserError
from esolm.likelihood import exact_logits
from esolm.methods import as_method
from esolm.model import masks
from esolm.model.backbone import FrozenConditioning
from esolm.model.shift import is_shifted
from esolm.sampling.api import cut_at_eos, free_positions, generate, needs_start_token, prepare
from esolm.sampling.common import DIFFUSION, SEQUENTIAL
from esolm.sampling.decoders import decoder_for
from esolm.sampling.draw import draw_segments, sampling_logits
from esolm.sampling.params import SamplingParams, check_integer

Tensor = torch.Tensor
log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # most alternatives per token a request may ask for
SCORE_ROWS_PER_CHUNK = 256  # positions whose float64 log-probabilities one scoring chunk holds at once

TopLogprobs = list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass(frozen=True)
class CompletionRequest:
    """One completion: positions ``p .. p + max_tokens - 1`` after the ``p`` prompt tokens, decoded with
    ``params`` (the :class:`~esolm.sampling.params.SamplingParams` that ``generate`` takes). ``logprobs``
    (batched methods): record each sampled token's log-probability and the ``logprobs`` most likely tokens
    (0: none) of the law it was drawn from (module docstring); ``None``: record nothing."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    infill: dict[int, int] | None = None  # absolute position -> token id, inside the completion
    logprobs: int | None = None


@dataclass
class StepEvent:
    """The positions (absolute) and tokens one engine step decided for one request (with ``logprobs``: their
    log-probabilities and top alternatives, aligned with ``tokens``)."""

    request_id: int
    step: int  # 0-based decoding step of this request (= its NFE so far - 1)
    positions: list[int]
    tokens: list[int]  # as drawn (Finished.tokens apply generate's EOS cut)
    phase: str  # "diffusion" | "sequential"
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None


@dataclass
class Finished:
    """A request's end: completion ids (after the EOS cut), cost and why it ended. With ``logprobs``: one entry
    per completion position, ``None`` where the token was given (infill) or filled by the EOS cut."""

    request_id: int
    tokens: list[int]
    nfe: int
    seconds: float  # from admission to finish
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    logprobs: list[float | None] | None = None
    top_logprobs: list[TopLogprobs | None] | None = None


@dataclass
class PromptScores:
    """:meth:`Engine.score` of one prompt: per token, its exact log-probability given the tokens before it and
    the most likely tokens there (``None`` for the first token, which nothing before it predicts)."""

    logprobs: list[float | None]
    top_logprobs: list[TopLogprobs | None]


def law_logprobs(logits: Tensor, tokens: Tensor, mask_id: int | None, top_p: float | None, temperature: float,
                 k: int) -> tuple[list[float], list[TopLogprobs]]:
    """The float64 log-probabilities of ``tokens`` [N] under the law :func:`~esolm.sampling.draw.sampling_logits`
    of ``logits`` [N, V] (what :func:`esolm.rl.trajectory.token_logprobs` records), and each row's ``k`` most
    likely tokens (tokens outside the nucleus, of probability 0, are never listed)."""
    lp = sampling_logits(logits, mask_id, top_p, temperature).log_softmax(-1)
    chosen = lp.gather(-1, tokens[:, None])[:, 0].tolist()
    if k == 0:
        return chosen, [[] for _ in chosen]
    values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    top = [[(i, v) for i, v in zip(row_ids, row_values) if v != -math.inf]
           for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    return chosen, top


def check_token_ids(ids, config, what: str) -> list[int]:
    """``ids`` as a list of token ids of the model's vocabulary, none the mask id, at most its length tokens;
    UserError (one line) otherwise."""
    if not isinstance(ids, (list, tuple)):
        raise UserError(f"{what} must be a list of token ids")
    if len(ids) > config.length:
        raise UserError(f"{what} ({len(ids)} tokens) exceeds the model length {config.length}")
    out = [check_integer(t, f"{what} token id", 0, config.vocab_size - 1) for t in ids]
    if config.mask_id is not None and config.mask_id in out:
        raise UserError(f"{what} contains the mask id {config.mask_id} at index {out.index(config.mask_id)}; "
                        "a prompt holds given tokens only")
    return out


class QueueFull(EsoLMError):
    """``max_queue`` requests are already waiting."""


class ShuttingDown(UserError):
    """:meth:`Engine.shutdown` was called: no new request is accepted (the HTTP server answers 503)."""


Callback = Callable[[StepEvent | Finished], None]


class SlotKV:
    """Per-row keys/values by slot for ``DiT.forward(cache=...)`` (module docstring).

    :meth:`prepare` gives, before a call, the slot of each new token ([B, S]; ``capacity`` for padding,
    which lands in one scratch slot that is never read) and how many slots the call reads; ``update`` then
    writes the new keys/values (one ``scatter_``) and returns views of the first ``kv_len`` slots.
    """

    def __init__(self, n_layers: int, max_batch: int, n_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (max_batch, n_heads, capacity + 1, head_dim)
        # zeros: slots never written must still be finite (masked keys enter the attention product)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._index: Tensor | None = None
        self._kv_len = 0

    @property
    def slot_bytes(self) -> int:
        """Bytes of keys and values per row (slot) over all layers."""
        return sum(t[0].numel() * t.element_size() for t in self.k + self.v)

    def prepare(self, dst: Tensor, kv_len: int) -> None:
        _, h, _, d = self.k[0].shape
        self._index = dst[:, None, :, None].expand(-1, h, -1, d)
        self._kv_len = kv_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b = k.shape[0]
        ck, cv = self.k[layer][:b], self.v[layer][:b]
        ck.scatter_(2, self._index, k)
        cv.scatter_(2, self._index, v)
        return ck[:, :, :self._kv_len], cv[:, :, :self._kv_len]

    def commit(self, n: int) -> None:
        """Nothing to do: the new tokens are in their slots already (``DiT.forward`` calls this)."""

    def move(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` slots of row ``src`` to row ``dst``."""
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]


class _Pending:
    __slots__ = ("rid", "req", "x", "on_event")

    def __init__(self, rid: int, req: CompletionRequest, x: Tensor, on_event: Callback):
        self.rid, self.req, self.x, self.on_event = rid, req, x, on_event  # x: [1, p + max_tokens] initial tokens


class _Row:
    """An admitted request of the batched path. Sorted tokens and positions live in the engine's slot
    tensors (row ``slot``); sorted range ``[lo, hi)`` of step ``k`` is ``bounds[k]``."""

    def __init__(self, pending: _Pending, slot: int, order: Tensor, bounds: list[tuple[int, int]], shift: int,
                 diffusion_end: int, n_given: int, eos_at: float, generator: torch.Generator):
        self.pending = pending
        # with logprobs: position -> (log-probability, top alternatives) of each drawn token
        self.logprobs: dict[int, tuple[float, TopLogprobs]] | None = (
            None if pending.req.logprobs is None else {})
        self.slot = slot
        self.order = order  # [length] sorted index -> position (CPU)
        self.order_list = order.tolist()
        self.bounds = bounds
        self.shift = shift  # AR feeds the tokens before its position, Eso-LM the masks too
        self.diffusion_end = diffusion_end
        self.eos_at = eos_at  # first EOS position >= prompt length among decided tokens (inf: none)
        # smallest position at sorted index >= j: the first position not decided before step j
        self.rest = torch.flip(torch.cummin(torch.flip(order, [0]), 0).values, [0]).tolist() + [math.inf]
        self.generator = generator
        self.k = 0
        self.start = 0  # sorted indices below it are in the cache
        self.decided = n_given  # sorted indices below it are decided
        self.t0 = time.perf_counter()

    @property
    def rid(self) -> int:
        return self.pending.rid

    @property
    def done(self) -> bool:
        """Every position decided, or an EOS before every undecided one (the cut fills those with EOS)."""
        return self.decided == len(self.order_list) or self.eos_at < self.rest[self.decided]


def _cut(tokens: Tensor, prompt_len: int, eos_id: int | None) -> tuple[list[int], str]:
    """Completion ids of ``tokens`` [L] (original order) after ``generate``'s EOS cut, and the reason."""
    if eos_id is None:
        return tokens[prompt_len:].tolist(), "length"
    cut, n = cut_at_eos(tokens[None], prompt_len, eos_id)
    stopped = bool(cut[0, int(n[0]) - 1] == eos_id) and int(n[0]) > prompt_len
    return cut[0, prompt_len:].tolist(), "stop" if stopped else "length"


class Engine:
    """Continuous-batching decoder for one model (module docstring).

    ``submit``/``cancel`` may be called from any thread; ``step`` (or the thread of :meth:`start`) does the
    work and calls ``on_event`` from that thread with each :class:`StepEvent` and one final :class:`Finished`.
    A request whose processing raises (its callback included) ends alone with ``finish_reason="error"``.
    ``step_observer(seconds, requests)``, if given, is called from that thread after every network step (the
    HTTP server's metrics). The model is put in eval mode.
    """

    def __init__(self, model, method, *, max_batch: int = 8, max_queue: int = 64, eos_id: int | None = None,
                 bos_id: int | None = None, step_observer: Callable[[float, int], None] | None = None):
        self.model = model.eval()
        self.method = as_method(method)
        cfg = model.config
        self.max_batch = check_integer(max_batch, "max_batch", 1)
        self.max_queue = check_integer(max_queue, "max_queue", 1)
        for what, i in (("eos_id", eos_id), ("bos_id", bos_id)):
            if i is not None and check_integer(i, what, 0, cfg.vocab_size - 1) == cfg.mask_id:
                raise UserError(f"{what} {i} is the mask id")
        self.eos_id, self.bos_id = eos_id, bos_id
        self.step_observer = step_observer
        self.decoder = decoder_for(self.method)
        # a diffusion method on a network under the shifted query convention decodes whole requests through
        # generate (its query rows are not the engine's one-row-per-slot steps); AR is the same on any network
        self.batched = self.method.batchable and not (self.method.is_diffusion and is_shifted(self.model))

        self._cv = threading.Condition(threading.Lock())
        self._step_lock = threading.Lock()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._dropped: list[_Pending] = []  # cancelled while queued: Finished at the next step
        self._cancel: set[int] = set()
        self._live: set[int] = set()
        self._next_id = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._rows: list[_Row] = []
        self._n_active = 0
        self._counts = dict(steps=0, nfe=0, tokens=0)

        self._cache = None
        self._cond: dict[int, FrozenConditioning] = {}
        if self.batched:
            device = model.device
            dtype = model.dtype
            with torch.inference_mode():
                n_layers, kv_heads, head_dim = model.kv_layout()  # any backbone: DiT, EsoLlama (grouped KV heads)
                self._cache = SlotKV(n_layers, self.max_batch, kv_heads, cfg.length, head_dim, dtype,
                                     device)
                self._tok = torch.zeros(self.max_batch, cfg.length, dtype=torch.long, device=device)
                self._pos = torch.zeros_like(self._tok)
                self._cond1 = model.frozen_conditioning(1)

    @property
    def slot_bytes(self) -> int:
        """Bytes of KV cache per batch slot (0 for the one-at-a-time methods: ``generate`` allocates its own)."""
        return self._cache.slot_bytes if self._cache is not None else 0

    @property
    def stats(self) -> dict:
        """Requests active and queued; network calls (steps), per-request steps (nfe) and tokens served."""
        with self._cv:
            return dict(active=self._n_active, queued=len(self._queue), **self._counts)

    # ---------------------------------------------------------------- requests
    def check(self, req: CompletionRequest) -> CompletionRequest:
        """``req`` validated and normalised (UserError, one line, for anything ``generate`` would refuse)."""
        return self._checked(req)[0]

    def _checked(self, req: CompletionRequest) -> tuple[CompletionRequest, Tensor]:
        """The normalised request (prompt with its start token, resolved params) and its initial tokens."""
        if not isinstance(req, CompletionRequest):
            raise UserError(f"expected a CompletionRequest, got {type(req).__name__}")
        cfg = self.model.config
        prompt = check_token_ids(req.prompt_ids, cfg, "the prompt")
        if req.logprobs is not None:
            check_integer(req.logprobs, "logprobs (the number of top alternatives)", 0, MAX_TOP_LOGPROBS)
            if not self.batched:
                raise UserError(f"logprobs of sampled tokens need an Eso-LM (B) or AR model, whose engine records "
                                f"each token's law as it draws it; {self.method.label} is decoded by generate")
        max_tokens = check_integer(req.max_tokens, "max_tokens", 1, cfg.length)
        if not prompt and needs_start_token(self.method, self.model):
            start = self.bos_id if self.bos_id is not None else self.eos_id
            if start is None:
                raise UserError(f"{self.method.label} needs a prompt (this engine has no bos_id or eos_id)")
            prompt = [start]
        if len(prompt) + max_tokens > cfg.length:
            raise UserError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model length "
                            f"{cfg.length}")
        self.method.check_length(len(prompt) + max_tokens)
        if not isinstance(req.params, SamplingParams):
            raise UserError(f"params must be a SamplingParams, got {type(req.params).__name__}")
        if req.infill is not None and not isinstance(req.infill, dict):
            raise UserError("infill must map positions to token ids")
        try:
            prepared = prepare(self.model, self.method, req.params, prompt_ids=[prompt], infill=req.infill,
                               max_length=len(prompt) + max_tokens, eos_id=self.eos_id, bos_id=self.bos_id)
        except ConfigError as e:
            raise UserError(str(e)) from None
        infill = None if req.infill is None else {int(k): int(v) for k, v in req.infill.items()}
        return (CompletionRequest(prompt, max_tokens, prepared.params, infill, req.logprobs), prepared.tokens)

    def score(self, prompts: list[list[int]], top_k: int = 0) -> list[PromptScores]:
        """Each prompt's exact per-token log-probabilities given the tokens before it (left to right), and the
        ``top_k`` most likely tokens at each position, all under the model's own law (temperature 1, mask
        excluded; :func:`esolm.likelihood.exact_logits`, the pass of ``exact_token_logprobs``). Methods with
        ``exact_likelihood`` only (AR, Eso-LM (B)); UserError otherwise, or for bad ids. Thread-safe: it runs
        between engine steps (up to ``max_batch`` prompts per pass), never during one."""
        if not self.method.exact_likelihood:
            raise UserError(f"prompt log-probabilities need a model with exact likelihoods (AR or Eso-LM (B)); "
                            f"{self.method.label}'s likelihood is only a bound")
        top_k = check_integer(top_k, "top_k", 0, MAX_TOP_LOGPROBS)
        if not isinstance(prompts, (list, tuple)):
            raise UserError("prompts must be a list of token-id lists")
        cfg = self.model.config
        prompts = [check_token_ids(p, cfg, f"prompt {i}") for i, p in enumerate(prompts)]
        out: list[PromptScores] = []
        for first in range(0, len(prompts), self.max_batch):
            chunk = prompts[first:first + self.max_batch]
            with self._step_lock, torch.inference_mode():
                out.extend(self._score(chunk, top_k))
        return out

    def _score(self, prompts: list[list[int]], top_k: int) -> list[PromptScores]:
        device = self.model.device
        n = max(len(p) for p in prompts)
        scores = [PromptScores([None] * min(len(p), 1), [None] * min(len(p), 1)) for p in prompts]
        if n < 2:
            return scores
        x = torch.full((len(prompts), n), self.model.config.mask_id or 0, dtype=torch.long)
        valid = torch.zeros(len(prompts), n, dtype=torch.bool)
        for i, p in enumerate(prompts):
            x[i, :len(p)] = torch.tensor(p, dtype=torch.long)
            valid[i, :len(p)] = True
        x, valid = x.to(device), valid.to(device)
        logits = exact_logits(self.model, self.method, x, None if bool(valid.all()) else valid)
        for i, p in enumerate(prompts):
            for lo in range(0, len(p) - 1, SCORE_ROWS_PER_CHUNK):
                hi = min(lo + SCORE_ROWS_PER_CHUNK, len(p) - 1)
                chosen, top = law_logprobs(logits[i, lo:hi], x[i, lo + 1:hi + 1], self.model.config.mask_id, None,
                                           1.0, top_k)
                scores[i].logprobs.extend(chosen)
                scores[i].top_logprobs.extend(top)
        return scores

    def submit(self, req: CompletionRequest, on_event: Callback) -> int:
        """Queue ``req`` (checked first); returns its id. QueueFull when ``max_queue`` requests wait."""
        req, x = self._checked(req)
        with self._cv:
            if self._closed:
                raise ShuttingDown("the engine is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            rid = self._next_id
            self._next_id += 1
            self._queue.append(_Pending(rid, req, x, on_event))
            self._live.add(rid)
            self._cv.notify_all()
        return rid

    def cancel(self, request_id: int) -> None:
        """Stop a request: it leaves at the next step with ``Finished(finish_reason="cancelled")``."""
        with self._cv:
            if request_id not in self._live:
                return
            for p in self._queue:
                if p.rid == request_id:
                    self._queue.remove(p)
                    self._dropped.append(p)
                    break
            else:
                self._cancel.add(request_id)
            self._cv.notify_all()

    # ---------------------------------------------------------------- stepping
    def step(self) -> bool:
        """Admit waiting requests into free slots and advance every active one by one step (one network
        call for the batched methods, a whole request for the others). False when there was nothing to do."""
        with self._step_lock, torch.inference_mode():
            with self._cv:
                dropped, self._dropped = self._dropped, []
                cancel, self._cancel = self._cancel, set()
            for p in dropped:
                self._finish(p, [], 0, 0.0, "cancelled")
            for row in [r for r in self._rows if r.rid in cancel]:
                self._leave(row, "cancelled")
            with self._cv:
                free = (self.max_batch - len(self._rows)) if self.batched else 1
                admit = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
            if not self.batched:
                for p in admit:
                    t0 = time.perf_counter()
                    self._run_whole(p)
                    self._observe(time.perf_counter() - t0, 1)
                return bool(dropped or cancel or admit)
            for p in admit:
                self._admit(p)
            stepped = bool(self._rows)
            if stepped:
                t0, b = time.perf_counter(), len(self._rows)
                self._batched_step()
                self._observe(time.perf_counter() - t0, b)
            with self._cv:
                self._n_active = len(self._rows)
            return bool(dropped or cancel or admit or stepped)

    def _observe(self, seconds: float, requests: int) -> None:
        if self.step_observer is not None:
            try:
                self.step_observer(seconds, requests)
            except Exception:  # an observer's failure is not the requests'
                log.exception("step_observer failed")

    def run_until_idle(self) -> None:
        """Step until no request is queued or active."""
        while self._has_work():
            self.step()

    def _has_work(self) -> bool:
        with self._cv:
            return bool(self._queue or self._dropped or self._cancel or self._rows)

    def start(self) -> None:
        """Run :meth:`step` in a daemon thread while there is work (it sleeps otherwise)."""
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._loop, name="esolm-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._queue or self._dropped or self._cancel or self._rows or self._closed):
                    self._cv.wait()
                if self._closed and not (self._queue or self._dropped or self._cancel or self._rows):
                    return
            try:
                self.step()
            except Exception as e:  # a bug outside any one request: fail the active ones, keep serving
                log.exception("engine step failed")
                with self._step_lock:
                    rows, self._rows = self._rows, []
                    for row in rows:
                        self._finish(row.pending, [], row.k, time.perf_counter() - row.t0, "error", e)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; finish the queued and active ones (``drain``) or cancel them, then stop the
        thread of :meth:`start` (waiting up to ``timeout`` seconds), or step here when none runs."""
        with self._cv:
            self._closed = True
            if not drain:
                self._dropped.extend(self._queue)
                self._queue.clear()
                self._cancel.update(self._live)
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        else:
            self.run_until_idle()

    # ---------------------------------------------------------------- request lifecycle
    def _emit(self, pending: _Pending, event) -> Exception | None:
        try:
            pending.on_event(event)
        except Exception as e:
            return e
        return None

    def _finish(self, pending: _Pending, tokens: list[int], nfe: int, seconds: float, reason: str,
                error: Exception | None = None, recorded: dict[int, tuple[float, TopLogprobs]] | None = None
                ) -> None:
        msg = None if error is None else f"{type(error).__name__}: {error}"
        if error is not None:
            log.error("request %d failed: %s", pending.rid, msg)
        lps = tops = None
        if recorded is not None:
            p = len(pending.req.prompt_ids)
            end = tokens.index(self.eos_id) + 1 if self.eos_id in tokens else len(tokens)  # after: the cut's EOS
            at = [recorded.get(p + j) if j < end else None for j in range(len(tokens))]
            lps = [None if r is None else r[0] for r in at]
            tops = [None if r is None else r[1] for r in at]
        self._emit(pending, Finished(pending.rid, tokens, nfe, seconds, reason, msg, lps, tops))
        with self._cv:
            self._live.discard(pending.rid)

    def _plan(self, p: _Pending):
        """The plan ``generate`` builds for this one sample (the decoder's, same plan-generator use)."""
        req = p.req
        gen = torch.Generator().manual_seed(req.params.seed)
        prompt_len = len(req.prompt_ids)
        return self.decoder.plan(free_positions(p.x, self.model.config.mask_id, prompt_len), prompt_len, req.params,
                                 gen)

    def _admit(self, p: _Pending) -> None:
        req, x = p.req, p.x
        try:
            length = x.shape[1]
            plan = self._plan(p)
            order, bounds, shift = plan.order[0], plan.bounds(), self.decoder.shift
            n_given, diffusion_end = plan.n_given, plan.diffusion_end
            given_eos = [q for q, t in (req.infill or {}).items() if t == self.eos_id]  # all after the prompt
            eos_at = min(given_eos, default=math.inf)
            gen = torch.Generator(device=self.model.device).manual_seed(req.params.seed)
            slot = len(self._rows)
            self._tok[slot, :length] = x[0, order].to(self._tok.device)
            self._pos[slot, :length] = order.to(self._tok.device)
            row = _Row(p, slot, order, bounds, shift, diffusion_end, n_given, eos_at, gen)
        except Exception as e:
            self._finish(p, [], 0, 0.0, "error", e)
            return
        self._rows.append(row)
        if row.done:  # nothing to decode (all given), or an infill EOS precedes it all
            self._leave(row)
        with self._cv:
            self._n_active = len(self._rows)

    def _leave(self, row: _Row, reason: str | None = None, error: Exception | None = None) -> None:
        """Remove ``row`` (its slot gets the last row) and emit its Finished (reason None: by its tokens)."""
        tokens: list[int] = []
        if error is None and reason != "cancelled":
            length = len(row.order_list)
            sorted_tok = self._tok[row.slot, :length].cpu()
            out = torch.empty_like(sorted_tok).scatter_(0, row.order, sorted_tok)
            tokens, reason = _cut(out, len(row.pending.req.prompt_ids), self.eos_id)
        last = self._rows.pop()
        if last is not row:
            self._cache.move(last.slot, row.slot, last.start)
            self._tok[row.slot] = self._tok[last.slot]
            self._pos[row.slot] = self._pos[last.slot]
            last.slot = row.slot
            self._rows[row.slot] = last
        self._finish(row.pending, tokens, row.k, time.perf_counter() - row.t0, reason, error,
                     row.logprobs if tokens else None)

    def _batched_step(self) -> None:
        rows = self._rows
        b = len(rows)
        device = self._tok.device
        feed = [(r.start, r.bounds[r.k][1] - r.shift) for r in rows]
        n_new = torch.tensor([hi - lo for lo, hi in feed])
        n_out = [hi - lo for lo, hi in (r.bounds[r.k] for r in rows)]
        s, m = int(n_new.max()), max(n_out)
        kv_len = max(hi for _, hi in feed)
        start = torch.tensor([lo for lo, _ in feed])
        # right-aligned: new token u of row i sits at sorted index start_i + u - (s - n_i)
        slot = start[:, None] + torch.arange(s)[None] - (s - n_new)[:, None]
        capacity = self._tok.shape[1]
        dst = torch.where(slot >= start[:, None], slot, capacity).to(device)  # padding: the scratch slot
        idx = slot.clamp(min=0).to(device)
        self._cache.prepare(dst, kv_len)
        try:
            logits = self.model(self._tok[:b].gather(1, idx), self._pos[:b].gather(1, idx),
                                mask=masks.slot_causal(idx, kv_len), cache=self._cache, cond=self._conditioning(b),
                                logits_slice=slice(s - m, None))
        except Exception as e:  # nothing to blame on one request: the whole batch fails
            for row in list(rows):
                self._leave(row, "error", e)
            return
        self._counts["steps"] += 1
        # each row's n_out[i] last logits, packed row after row: [sum(n_out), V]
        if min(n_out) == m:
            needed = logits.reshape(b * m, -1)
        else:
            at_row = [i for i, n in enumerate(n_out) for _ in range(n)]
            at_pos = [u for n in n_out for u in range(m - n, m)]
            needed = logits[torch.tensor(at_row, device=device), torch.tensor(at_pos, device=device)]
        ps = [r.pending.req.params for r in rows]
        try:
            drawn = draw_segments(needed, n_out, self.model.config.mask_id, [q.top_p for q in ps],
                                  [q.draw_temperature for q in ps], [q.greedy for q in ps], [r.generator for r in rows])
            at_slot = [r.slot for r, n in zip(rows, n_out) for _ in range(n)]
            at_index = [j for r in rows for j in range(*r.bounds[r.k])]
            self._tok[torch.tensor(at_slot, device=device), torch.tensor(at_index, device=device)] = drawn
            drawn_list = drawn.tolist()
            recorded = self._record_logprobs(rows, n_out, needed, drawn)
        except Exception as e:
            for row in list(rows):
                self._leave(row, "error", e)
            return
        self._counts["nfe"] += b
        self._counts["tokens"] += len(drawn_list)
        leaving: list[tuple[_Row, Exception | None]] = []
        a = 0
        for row in rows:
            lo, hi = row.bounds[row.k]
            new = drawn_list[a:a + hi - lo]
            a += hi - lo
            try:
                positions = row.order_list[lo:hi]
                if self.eos_id is not None and self.eos_id in new:
                    row.eos_at = min(row.eos_at, *(q for q, t in zip(positions, new) if t == self.eos_id))
                phase = DIFFUSION if lo < row.diffusion_end else SEQUENTIAL
                event = StepEvent(row.rid, row.k, positions, new, phase)
                if row.logprobs is not None:
                    event.logprobs, event.top_logprobs = recorded[row.rid]
                    row.logprobs.update(zip(positions, zip(*recorded[row.rid])))
                row.k += 1
                row.start, row.decided = lo, hi
                err = self._emit(row.pending, event)
                if err is not None:
                    raise err
                if row.done:
                    leaving.append((row, None))
            except Exception as e:
                leaving.append((row, e))
        for row, err in leaving:
            self._leave(row, "error" if err is not None else None, err)

    def _record_logprobs(self, rows: list[_Row], n_out: list[int], needed: Tensor, drawn: Tensor
                         ) -> dict[int, tuple[list[float], list[TopLogprobs]]]:
        """request id -> (log-probabilities, top alternatives) of the tokens this step drew, for the rows that
        asked (the others cost nothing)."""
        out = {}
        a = 0
        for row, n in zip(rows, n_out):
            q, k = row.pending.req.params, row.pending.req.logprobs
            if k is not None:
                out[row.rid] = law_logprobs(needed[a:a + n], drawn[a:a + n], self.model.config.mask_id,
                                            None if q.greedy else q.top_p, q.draw_temperature, k)
            a += n
        return out

    def _conditioning(self, b: int) -> FrozenConditioning | None:
        """The one-sample frozen conditioning relabelled for ``b`` rows: its folded weights do not depend on
        the row (sigma = 0 for every row), so they serve any batch."""
        if self._cond1 is None:  # a backbone without time conditioning (EsoLlama)
            return None
        if b not in self._cond:
            self._cond[b] = dataclasses.replace(self._cond1, batch_size=b)
        return self._cond[b]

    def _run_whole(self, p: _Pending) -> None:
        """A non-batched method: the whole request through ``generate``, then its events from the typed trace."""
        req = p.req
        t0 = time.perf_counter()
        try:
            prompt_len = len(req.prompt_ids)
            out = generate(self.model, self.method, prompt_ids=[req.prompt_ids], infill=req.infill, params=req.params,
                           max_length=p.x.shape[1], bos_id=self.bos_id, trace=True)
            tokens = out.tokens[0]
            for step in out.trace[0]:
                positions = step.row(0)
                event = StepEvent(p.rid, step.call, positions, tokens[positions].tolist(), step.phase)
                err = self._emit(p, event)
                if err is not None:
                    raise err
            self._counts["steps"] += out.nfe
            self._counts["nfe"] += out.nfe
            self._counts["tokens"] += int((p.x[0] == self.model.config.mask_id).sum())
            completion, reason = _cut(tokens, prompt_len, self.eos_id)
        except Exception as e:
            self._finish(p, [], 0, time.perf_counter() - t0, "error", e)
            return
        self._finish(p, completion, out.nfe, time.perf_counter() - t0, reason)
