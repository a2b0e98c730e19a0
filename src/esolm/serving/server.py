"""HTTP front of the serving engine (FastAPI): the OpenAI completions API, streamed one event per decoding step.

Routes (docs/serving.md has every field):

* ``POST /v1/completions`` — OpenAI fields ``prompt`` (a text, a list of texts, a list of token ids or a list of
  such lists; the model's BOS is put before a text, token ids are taken as they are), ``suffix`` (insert mode: its
  tokens end the completion window, diffusion models), ``max_tokens`` (default: the rest of the model's length; 0
  with ``echo``: score the prompt only), ``temperature`` (0: greedy), ``top_p``, ``n``, ``stop``, ``seed``,
  ``stream``, ``stream_options``, ``logprobs`` (0..5), ``echo``, ``user``; esolm fields ``alpha0``, ``steps``,
  ``schedule``, ``infill`` (completion-relative position -> text, whose tokens are given from that position on).
  Choice ``i * n + j`` is choice ``j`` of prompt ``i`` and uses seed ``seed + j``, so it is exactly the sample
  ``esolm.generate`` draws alone for that prompt with that seed. ``stop`` strings cut the final text (diffusion
  decodes out of order, so decoding is never stopped early by them).
* ``logprobs`` — OpenAI's ``{tokens, token_logprobs, top_logprobs, text_offset}``: each sampled token's exact
  log-probability under the law it was drawn from, recorded by the engine at the step that drew it (Eso-LM (B),
  AR; other methods: 400); with ``echo``, the prompt's exact left-to-right conditionals (``null`` for its first
  token; AR and Eso-LM (B); other methods, whose likelihood is only a bound: 400).
* ``POST /v1/chat/completions`` — ``messages`` rendered by the tokenizer's Jinja chat template (or
  ``esolm serve --chat-template``; none: 400), then decoded as a text prompt; ``logprobs``/``top_logprobs``.
* ``stream: true`` — server-sent events, each ``data: <json>``: a ``start`` event per choice (with ``echo``: the
  prompt's text and log-probabilities), a ``step`` event per decoding step (the positions and tokens it decided,
  their log-probabilities with ``logprobs``), a ``done`` event per choice carrying the completion text, then
  ``data: [DONE]``. Concatenating ``choices[0].text`` (chat: ``delta.content``) over the events gives the
  non-streamed text.
* ``GET /v1/models``; vLLM's ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (lm-eval's
  ``local-completions`` model finds and uses them); ``GET /health`` (engine statistics), ``GET /metrics``
  (Prometheus), ``GET /`` (the trace page) and ``/static/*``.

With an API key (``esolm serve --api-key``), ``/v1/*`` and the tokenizer routes need ``Authorization: Bearer KEY``
(401 otherwise). Errors are JSON ``{"error": {"message", "type", "code", "param"}}``: 413 for a body over the
server's limit (``esolm serve --max-body-bytes``; refused before anything parses it), 422 for a body that is not
JSON or of the wrong shape or types, 400 for values the model cannot serve (checked, off the event loop, before
anything is queued), 401 without the key, 404 for another model's name, 429 when the engine's queue is full, 503
while the server shuts down, 500 when a request fails while decoding. Messages repeat at most the first
:data:`MAX_ECHO` characters of a client's value.
A client that disconnects has its requests cancelled, which frees their slots at the next engine step.
The engine thread starts with the app and is drained when it stops (uvicorn's graceful shutdown on SIGTERM
first lets in-flight requests finish).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from esolm.data.tokenizers import check_text
from esolm.errors import EsoLMError, UserError, one_line
from esolm.sampling.params import SamplingParams, check_integer
from esolm.serving.engine import (
    MAX_TOP_LOGPROBS,
    CompletionRequest,
    Finished,
    PromptScores,
    QueueFull,
    ShuttingDown,
    StepEvent,
    TopLogprobs,
    check_token_ids,
)

STATIC = Path(__file__).resolve().parent / "static"
MAX_CHOICES = 16  # most choices (n) per request; also at most the engine's queue
_json = json.JSONEncoder(check_circular=False).encode  # json.dumps' output, without the cycle check
MAX_STOP = 4  # most stop strings, as OpenAI
MAX_LOGPROBS = 5  # most alternatives per token of /v1/completions' logprobs, as OpenAI
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there
MAX_BODY_BYTES = 1 << 20  # default largest request body (413 beyond it, before anything parses it)
DRAIN_BYTES = 16 << 20  # most bytes of a refused body read and dropped before the 413
MAX_ECHO = 64  # characters of a client's value an error message repeats
MAX_MESSAGE = 1000  # characters of an error message

Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Text = Annotated[str, Field(strict=True)]


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with the usage and no choices."""

    model_config = ConfigDict(extra="forbid")

    include_usage: Annotated[bool, Field(strict=True)] = False


class _Body(BaseModel):
    """The fields both endpoints share (OpenAI's names; types only, values are checked against the model)."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    max_tokens: Int | None = None
    temperature: Float = 1.0
    top_p: Float | None = None
    n: Int = 1
    stop: Text | list[Text] | None = None
    seed: Int = 0
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    alpha0: Float | None = None  # esolm: Eso-LM's sampling alpha0
    steps: Int | None = None  # esolm: the schedule's steps
    schedule: Text = "auto"  # esolm: the sampler


class CompletionBody(_Body):
    """The JSON body of ``POST /v1/completions``."""

    prompt: Text | list[Text] | list[Int] | list[list[Int]] = ""
    suffix: Text | None = None
    logprobs: Int | None = None
    echo: Annotated[bool, Field(strict=True)] = False
    infill: dict[str, Text] | None = None


class ContentPart(BaseModel):
    """A part of a chat message's content (only ``{"type": "text", "text": ...}`` is served; the others are
    read, then refused with a 400 that says so)."""

    model_config = ConfigDict(extra="allow")

    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Text
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


class ChatBody(_Body):
    """The JSON body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: Int | None = None
    logprobs: Annotated[bool, Field(strict=True)] = False
    top_logprobs: Int | None = None


class TokenizeBody(BaseModel):
    """``POST /tokenize`` (vLLM's; lm-eval's ``local-completions`` with ``tokenizer_backend=remote``)."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    prompt: Text
    add_special_tokens: Annotated[bool, Field(strict=True)] = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    tokens: list[Int]


def _clip(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` cut to its first ``limit`` characters (a client's value echoed in an error message)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ApiError(Exception):
    """An HTTP error with OpenAI's JSON body (message cut to :data:`MAX_MESSAGE` characters, param to
    :data:`MAX_ECHO`: an error never echoes a request's large values back)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        message = _clip(message, MAX_MESSAGE)
        param = None if param is None else _clip(param)
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    @property
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=headers)


class _Relay:
    """Hands engine events to one event loop in batches (one loop callback per batch, not per event): the
    engine thread appends ``(job, choice index, event)``; the append that finds the batch empty schedules a
    delivery, which gives every event batched by then to its job, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._batch: list[tuple[_Job, int, StepEvent | Finished]] = []

    def put(self, job: _Job, index: int, event: StepEvent | Finished) -> None:  # on the engine thread
        with self._lock:
            first = not self._batch
            self._batch.append((job, index, event))
        if first:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _deliver(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, []
        for job, index, event in batch:
            job.push(index, event)


class _Job:
    """The engine requests of one HTTP request: their ids, and the ``(choice index, StepEvent | Finished)``
    that the engine thread hands over through ``relay``, waiting to be read."""

    def __init__(self, engine, relay: _Relay, steps_wanted: bool):
        self.engine = engine
        self.relay = relay
        self.steps_wanted = steps_wanted
        self.ids: list[int] = []
        self.finished: set[int] = set()  # choice indices
        self._items: list[tuple[int, StepEvent | Finished]] = []
        self._waiter: asyncio.Future | None = None

    def callback(self, index: int):
        def on_event(event) -> None:  # runs on the engine thread
            if self.steps_wanted or not isinstance(event, StepEvent):
                self.relay.put(self, index, event)

        return on_event

    def push(self, index: int, event: StepEvent | Finished) -> None:  # on the event loop
        self._items.append((index, event))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def submit(self, requests: list[CompletionRequest]) -> None:
        """Queue every choice, or none (QueueFull: the ones already queued are cancelled)."""
        try:
            for i, req in enumerate(requests):
                self.ids.append(self.engine.submit(req, self.callback(i)))
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancel the choices that have not finished (their slots are freed at the next engine step)."""
        for i, rid in enumerate(self.ids):
            if i not in self.finished:
                self.finished.add(i)
                self.engine.cancel(rid)

    async def batches(self, request: Request) -> AsyncIterator[list[tuple[int, StepEvent | Finished]]]:
        """The events of all choices in arrival order, as lists of all those arrived by then, until each
        choice has finished; stops early (cancelling the rest) when the client disconnects."""
        try:
            while len(self.finished) < len(self.ids):
                while not self._items:
                    self._waiter = self.relay.loop.create_future()
                    done, _ = await asyncio.wait({self._waiter}, timeout=DISCONNECT_POLL_S)
                    self._waiter = None
                    if not done and await request.is_disconnected():
                        return
                batch, self._items = self._items, []
                for index, event in batch:
                    if isinstance(event, Finished):
                        self.finished.add(index)
                yield batch
        finally:
            self.cancel()


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class _BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before anything parses it — as soon
    as its ``Content-Length`` says so, else as soon as the bytes received pass the limit (a chunked body).
    The rest of a refused body is read and dropped first, up to :data:`DRAIN_BYTES`, so that the client can
    read the answer (closing a connection with unread bytes resets it); the connection is then closed.
    A body within the limit is read here and handed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), b"")
        size = int(declared) if declared.isdigit() else None
        if size is not None and size > self.max_bytes:
            await self._refuse(scope, receive, send, size)
            return
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await self._refuse(scope, receive, send, size, message)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, size: int | None, message: dict | None = None) -> None:
        dropped = 0
        while message is None or (message["type"] == "http.request" and message.get("more_body", False)
                                  and dropped < DRAIN_BYTES):
            message = await receive()
            dropped += len(message.get("body", b""))
        shown = "" if size is None else f" ({size} bytes)"
        error = ApiError(413, f"the request body{shown} exceeds this server's limit of {self.max_bytes} bytes "
                              "(esolm serve --max-body-bytes)", code="request_too_large")
        await error.response({"Connection": "close"})(scope, receive, send)


class _Auth:
    """ASGI middleware: with an API key, a request to the API (``/v1/*`` and the tokenizer routes) needs the
    header ``Authorization: Bearer KEY`` (401 with OpenAI's JSON error otherwise); ``/health``, ``/metrics``,
    the trace page and its assets stay open."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _protected(scope["path"]):
            header = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
            scheme, _, token = header.strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                why = "no API key was given" if not header else "the API key is not valid"
                error = ApiError(401, f"{why}: send the header 'Authorization: Bearer KEY' (esolm serve --api-key)",
                                 code="invalid_api_key")
                await error.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _protected(path: str) -> bool:
    return path.startswith("/v1/") or path in TOKENIZER_ROUTES


class _Metrics:
    """Prometheus metrics of one app (its own registry): HTTP requests by route and status (ASGI middleware),
    the engine's queue, active slots, network calls, per-request NFE and tokens (read from ``engine.stats`` at
    each scrape), the time and batch of each engine step (``engine.step_observer``), and each finished
    choice's NFE."""

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)
        self.requests = Counter("esolm_http_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=self.registry)
        self.step_seconds = Histogram("esolm_step_seconds", "Wall time of one engine step (one network call for the "
                                      "batched methods, one whole request for the others)", registry=self.registry,
                                      buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.step_batch = Histogram("esolm_step_requests", "Requests advanced by one engine step",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.request_nfe = Histogram("esolm_request_nfe", "Network function evaluations of one finished choice",
                                     registry=self.registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
        previous = engine.step_observer

        def observe(seconds: float, requests: int) -> None:  # on the engine thread
            self.step_seconds.observe(seconds)
            self.step_batch.observe(requests)
            if previous is not None:
                previous(seconds, requests)

        engine.step_observer = observe

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.engine.stats
        yield GaugeMetricFamily("esolm_queue_depth", "Requests waiting for a slot", value=stats["queued"])
        yield GaugeMetricFamily("esolm_active_slots", "Requests being decoded", value=stats["active"])
        yield GaugeMetricFamily("esolm_max_batch", "Batch slots (esolm serve --max-batch)", value=self.engine.max_batch)
        yield CounterMetricFamily("esolm_engine_steps", "Engine network calls (one per step for the batched methods)",
                                  value=stats["steps"])
        yield CounterMetricFamily("esolm_nfe", "Network function evaluations summed over requests", value=stats["nfe"])
        yield CounterMetricFamily("esolm_tokens_generated", "Tokens decoded", value=stats["tokens"])

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def middleware(self, app):
        metrics = self

        async def counted(scope, receive, send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope["path"]
            route = path if path in ROUTES else "/static" if path.startswith("/static/") else "other"

            async def send_counted(message) -> None:
                if message["type"] == "http.response.start":
                    metrics.requests.labels(route, str(message["status"])).inc()
                await send(message)

            await app(scope, receive, send_counted)

        return counted


ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/", "/tokenize",
          "/detokenize", "/tokenizer_info")
TOKENIZER_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")


@dataclass
class _Prompt:
    """One prompt of a request: its ids, the positions generated after it and the completion window (the
    generated positions, then the suffix's tokens), the given tokens (infill and suffix; absolute positions)."""

    ids: list[int]
    max_tokens: int
    window: int
    given: dict[int, int] | None


@dataclass
class _Parsed:
    """A request checked against the model: its prompts, ``n`` choices each (choice ``i * n + j`` is choice
    ``j`` of prompt ``i``), their engine requests (none when ``max_tokens`` is 0), and the prompts' scores
    (``echo`` with ``logprobs``)."""

    prompts: list[_Prompt]
    n: int
    stop: list[str]
    logprobs: int | None
    echo: bool
    requests: list[CompletionRequest]
    scores: list[PromptScores] | None = None
    include_usage: bool = False

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def prompt(self, index: int) -> _Prompt:
        return self.prompts[index // self.n]


@dataclass
class _Tok:
    """A token of a response's log-probabilities: its id, text, log-probability (None: given, not sampled, or
    the first token of an echoed prompt), top alternatives and offset in the choice's text."""

    id: int
    text: str
    logprob: float | None
    top: TopLogprobs | None
    offset: int


@dataclass
class _Choice:
    """A finished choice: the echoed prompt text and the completion text (after the stop-string cut), why it
    ended, its log-probability tokens (echo part, completion part), tokens generated and its cost."""

    index: int
    echo_text: str
    text: str
    finish_reason: str
    echo_tokens: list[_Tok]
    tokens: list[_Tok]
    generated: int
    esolm: dict


class _TextFormat:
    """OpenAI's legacy completions: ``text_completion`` objects, log-probabilities as
    ``{tokens, token_logprobs, top_logprobs, text_offset}``."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, service: CompletionService):
        self.service = service

    def logprobs(self, toks: list[_Tok]) -> dict:
        return {"tokens": [t.text for t in toks], "token_logprobs": [t.logprob for t in toks],
                "top_logprobs": [None if t.top is None else self.top(t) for t in toks],
                "text_offset": [t.offset for t in toks]}

    def top(self, t: _Tok) -> dict[str, float]:
        """The top alternatives of ``t``, and ``t`` itself (as OpenAI: up to ``logprobs + 1`` entries)."""
        top = self.service.top_dict(t.top)
        top.setdefault(t.text, t.logprob)
        return top

    def choice(self, c: _Choice, with_logprobs: bool) -> dict:
        lp = self.logprobs(c.echo_tokens + c.tokens) if with_logprobs else None
        return {"index": c.index, "text": c.echo_text + c.text, "logprobs": lp, "finish_reason": c.finish_reason,
                "esolm": c.esolm}

    def start(self, index: int, echo_text: str, echo_tokens: list[_Tok] | None) -> dict:
        return {"index": index, "text": echo_text, "logprobs": None if echo_tokens is None else
                self.logprobs(echo_tokens), "finish_reason": None}

    def step(self, index: int) -> dict:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": None}

    def done(self, c: _Choice, with_logprobs: bool) -> dict:
        return {"index": c.index, "text": c.text, "logprobs": self.logprobs(c.tokens) if with_logprobs else None,
                "finish_reason": c.finish_reason}


class _ChatFormat(_TextFormat):
    """OpenAI's chat completions: ``chat.completion`` (``message``) and ``chat.completion.chunk`` (``delta``)
    objects, log-probabilities as ``{content: [{token, logprob, bytes, top_logprobs}]}``."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def logprobs(self, toks: list[_Tok]) -> dict:
        decode = self.service.decode_one

        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(decode(i), v) for i, v in t.top or []]}
                            for t in toks], "refusal": None}

    def choice(self, c: _Choice, with_logprobs: bool) -> dict:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": self.logprobs(c.tokens) if with_logprobs else None, "finish_reason": c.finish_reason,
                "esolm": c.esolm}

    def start(self, index: int, echo_text: str, echo_tokens: list[_Tok] | None) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def step(self, index: int) -> dict:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": None}

    def done(self, c: _Choice, with_logprobs: bool) -> dict:
        return {"index": c.index, "delta": {"content": c.text},
                "logprobs": self.logprobs(c.tokens) if with_logprobs else None, "finish_reason": c.finish_reason}


def compile_chat_template(text: str):
    """A Jinja chat template compiled in a sandbox (as Hugging Face's ``apply_chat_template`` does; the template
    may call ``raise_exception(message)``); UserError when jinja2 is missing or the template does not compile."""
    check_text(text, "the chat template")
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("a chat template needs the jinja2 package (pip install jinja2)") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(text)
    except TemplateError as e:
        raise UserError(f"the chat template does not compile: {one_line(e)}") from None


class CompletionService:
    """The OpenAI API over one engine: a body becomes engine requests (:meth:`parse`, :meth:`parse_chat`),
    which are queued (:meth:`complete`) and answered as one OpenAI response or as a stream of events
    (:meth:`stream`).

    ``engine`` is an :class:`esolm.serving.engine.Engine`; ``tokenizer`` (an
    :class:`esolm.data.tokenizers.Tokenizer`) turns text into ids and back; ``model_name`` is the name served;
    ``chat_template`` (Jinja text; default the tokenizer's ``chat_template``) renders chat messages.
    :meth:`parse` and :meth:`parse_chat` are thread-safe (the app runs them in a worker thread: tokenizing a large
    prompt, or scoring it, takes time); everything else runs on the event loop.
    """

    def __init__(self, engine, tokenizer, model_name: str, chat_template: str | None = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.length = engine.model.config.length
        self.vocab_size = engine.model.config.vocab_size
        self.max_choices = min(MAX_CHOICES, engine.max_queue)
        self.created = int(time.time())
        self._texts: dict[int, str] = {}  # token id -> its text alone (filled as tokens first appear)
        self._relay: _Relay | None = None  # the relay of the running event loop
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        self.chat_template = chat_template
        self._template = None if chat_template is None else compile_chat_template(chat_template)
        self.metrics: _Metrics | None = None
        # the names of the special tokens /tokenizer_info lists, which /tokenize looks up as names
        self.specials = {name: i for name, i in ((self.decode_one(i), i) for i in
                                                 (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id))}

    # ---------------------------------------------------------------- requests
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {_clip(repr(model))} is not served here (this server serves "
                                f"{self.model_name!r})", code="model_not_found", param="model")

    def _stops(self, stop) -> list[str]:
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise UserError(f"stop must be up to {MAX_STOP} non-empty strings")
        return stop

    def _check_n(self, n: int) -> None:
        if not 1 <= n <= self.max_choices:
            raise UserError(f"n must be an integer in [1, {self.max_choices}], got {n}")

    def _prompt_ids(self, prompt) -> list[list[int]]:
        """The token ids of each prompt: text gets the model's BOS before it (the empty text is the BOS alone);
        token ids are taken as they are (checked: of the vocabulary, never the mask, at most the length)."""
        tokenizer, cfg = self.tokenizer, self.engine.model.config
        if isinstance(prompt, str):
            prompt = [prompt]
        elif not prompt:
            raise UserError("prompt is an empty list: give a text, a list of texts or token ids")
        elif isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for i, one in enumerate(prompt):
            what = "the prompt" if len(prompt) == 1 else f"prompt {i}"
            if isinstance(one, str):
                ids = tokenizer.encode_prompt(one, what=what) if one else [tokenizer.bos_id]
                if len(ids) > self.length:
                    raise UserError(f"{what} is {len(ids)} tokens (with BOS) but the model's length is {self.length}")
            else:
                if not one:
                    raise UserError(f"{what} is an empty list of token ids")
                ids = check_token_ids(one, cfg, what)
            out.append(ids)
        return out

    def parse(self, body: CompletionBody) -> _Parsed:
        """The checked request of ``body`` (UserError/ApiError for values the model cannot serve, before
        anything is queued); with ``echo`` and ``logprobs``, the prompts' scores too."""
        self._check_model(body.model)
        self._check_n(body.n)
        stop = self._stops(body.stop)
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise UserError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (the most likely tokens listed "
                            f"with each token), got {body.logprobs}")
        if body.max_tokens == 0 and not body.echo:
            raise UserError("max_tokens 0 generates nothing: use it with echo (and logprobs) to score a prompt")
        suffix = self.tokenizer.encode_text(body.suffix, "the suffix") if body.suffix else []
        if suffix and not self.engine.method.is_diffusion:
            raise UserError(f"suffix (insert mode) needs a diffusion model, which decodes any position; "
                            f"{self.engine.method.label} only continues a prompt")
        if suffix and body.max_tokens == 0:
            raise UserError("a suffix needs max_tokens >= 1 (the tokens inserted before it)")
        prompts = []
        for ids in self._prompt_ids(body.prompt):
            p, s, length = len(ids), len(suffix), self.length
            room = length - p - s
            max_tokens = body.max_tokens
            if max_tokens is None:
                max_tokens = room if room > 0 or not body.echo else 0
            tail = f" and the suffix's {s}" if s else ""
            if max_tokens > 0 and room < 1:
                raise UserError(f"the prompt is {p} tokens{tail} but the model's length is {length}: nothing left "
                                "to generate")
            if not 0 <= max_tokens <= room:
                raise UserError(f"max_tokens must be an integer in [{0 if body.echo else 1}, {room}] (the model's "
                                f"length {length} minus the prompt's {p} tokens{tail}), got {max_tokens}")
            given = self._infill(body.infill, p, max_tokens) if body.infill and max_tokens else None
            if suffix:
                given = {**(given or {}), **{p + max_tokens + j: t for j, t in enumerate(suffix)}}
            prompts.append(_Prompt(ids, max_tokens, max_tokens + s, given))
        if any(pr.window for pr in prompts) and len(prompts) * body.n > self.engine.max_queue:
            raise UserError(f"{len(prompts)} prompts x n={body.n} choices exceed the {self.engine.max_queue} requests "
                            "this server queues at once (esolm serve --max-queue)")
        requests = [self.engine.check(CompletionRequest(pr.ids, pr.window, SamplingParams.from_request(body, j),
                                                        pr.given, body.logprobs))
                    for pr in prompts if pr.window for j in range(body.n)]
        parsed = _Parsed(prompts, body.n, stop, body.logprobs, body.echo, requests,
                         include_usage=bool(body.stream_options and body.stream_options.include_usage))
        if body.echo and body.logprobs is not None:
            parsed.scores = self.engine.score([pr.ids for pr in prompts], body.logprobs)
        return parsed

    def parse_chat(self, body: ChatBody) -> _Parsed:
        """The checked request of a chat body: the messages rendered by the chat template, then encoded as a
        text prompt (the BOS before it; special-token strings in it are plain text)."""
        self._check_model(body.model)
        if self._template is None:
            raise UserError("this model's tokenizer has no chat template: use /v1/completions, or start the server "
                            "with esolm serve --chat-template FILE")
        self._check_n(body.n)
        stop = self._stops(body.stop)
        if not body.messages:
            raise UserError("messages is empty")
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise UserError("top_logprobs needs logprobs: true")
            check_integer(body.top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise UserError("give max_tokens or max_completion_tokens, not both")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise UserError(f"message {i}: only text content parts ({{\"type\": \"text\", \"text\": ...}}) "
                                    "are served")
                content = "".join(part.text for part in content)
            messages.append({"role": m.role, "content": content or "", **({"name": m.name} if m.name else {})})
        from jinja2 import TemplateError  # there is a template: jinja2 compiled it

        tok = self.tokenizer
        try:
            rendered = self._template.render(messages=messages, add_generation_prompt=True,
                                             bos_token=self.decode_one(tok.bos_id),
                                             eos_token=self.decode_one(tok.eos_id))
        except TemplateError as e:
            raise UserError(f"the chat template refused the messages: {one_line(e)}") from None
        ids = tok.encode_prompt(rendered, what="the rendered chat prompt")
        p = len(ids)
        room = self.length - p
        if room < 1:
            raise UserError(f"the rendered chat prompt is {p} tokens (with BOS) but the model's length is "
                            f"{self.length}: nothing left to generate")
        max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        max_tokens = room if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= room:
            raise UserError(f"max_tokens must be an integer in [1, {room}] (the model's length {self.length} minus "
                            f"the rendered prompt's {p} tokens), got {max_tokens}")
        k = (body.top_logprobs or 0) if body.logprobs else None
        requests = [self.engine.check(CompletionRequest(ids, max_tokens, SamplingParams.from_request(body, j),
                                                        None, k)) for j in range(body.n)]
        return _Parsed([_Prompt(ids, max_tokens, max_tokens, None)], body.n, stop, k, False, requests,
                       include_usage=bool(body.stream_options and body.stream_options.include_usage))

    def _infill(self, texts: dict[str, str], p: int, max_tokens: int) -> dict[int, int]:
        """Absolute position -> token id of the infill texts (completion position -> plain text)."""
        if len(texts) > max_tokens:
            raise UserError(f"infill has {len(texts)} texts but the completion has only {max_tokens} positions")
        infill: dict[int, int] = {}
        for key, text in texts.items():
            rel = int(key) if key.isascii() and key.isdigit() and len(key) <= 9 else -1
            if str(rel) != key:
                raise UserError(f"infill keys must be completion positions (integers >= 0 without leading zeros), "
                                f"got {_clip(repr(key))}")
            if rel >= max_tokens:
                raise UserError(f"infill position {rel} is outside the completion positions [0, {max_tokens})")
            ids = self.tokenizer.encode_text(text, f"the infill text at {rel}")
            if not ids:
                raise UserError(f"infill text at {rel} encodes to no tokens")
            if rel + len(ids) > max_tokens:
                raise UserError(f"infill text at {rel} ({len(ids)} tokens) does not fit in the completion "
                                f"positions [0, {max_tokens})")
            for j, tok in enumerate(ids, start=p + rel):
                if j in infill:
                    raise UserError(f"infill texts overlap at completion position {j - p}")
                infill[j] = tok
        return infill

    def relay(self) -> _Relay:
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = _Relay(loop)
        return self._relay

    async def complete(self, body: CompletionBody | ChatBody, request: Request):
        """Answer ``POST /v1/completions`` or ``/v1/chat/completions``: the body parsed off the event loop, its
        choices queued together, then the finished response (or, with ``stream``, the event stream)."""
        chat = isinstance(body, ChatBody)
        fmt = (_ChatFormat if chat else _TextFormat)(self)
        try:
            parsed = await asyncio.to_thread(self.parse_chat if chat else self.parse, body)
        except EsoLMError as e:
            raise ApiError(400, one_line(e)) from None
        job = None
        if parsed.requests:
            job = _Job(self.engine, self.relay(), steps_wanted=body.stream)
            try:
                job.submit(parsed.requests)
            except QueueFull as e:
                raise ApiError(429, one_line(e), type_="rate_limit_error", code="queue_full") from None
            except ShuttingDown as e:
                raise ApiError(503, one_line(e), type_="server_error", code="shutting_down") from None
            except EsoLMError as e:
                raise ApiError(400, one_line(e)) from None
        cid = f"{fmt.id_prefix}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(self.stream(fmt, job, request, cid, parsed), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=None if job is None else BackgroundTask(job.cancel))
        results: dict[int, Finished] = {}
        if job is not None:
            async for batch in job.batches(request):
                results.update(batch)
            if len(results) < len(parsed.requests):  # the client left
                return JSONResponse({}, status_code=499)
        choices = [self.choice(parsed, i, results.get(self._request_index(parsed, i))) for i in range(parsed.choices)]
        return {"id": cid, "object": fmt.object, "created": int(time.time()), "model": self.model_name,
                "choices": [fmt.choice(c, parsed.logprobs is not None) for c in choices],
                "usage": self.usage(parsed, choices)}

    @staticmethod
    def _request_index(parsed: _Parsed, index: int) -> int | None:
        """The engine request (job index) of choice ``index``; None when its prompt generates nothing."""
        if not parsed.prompt(index).window:
            return None
        before = sum(1 for pr in parsed.prompts[:index // parsed.n] if pr.window)
        return before * parsed.n + index % parsed.n

    def usage(self, parsed: _Parsed, choices: list[_Choice]) -> dict:
        p = sum(len(pr.ids) for pr in parsed.prompts)
        c = sum(ch.generated for ch in choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def stream(self, fmt: _TextFormat, job: _Job | None, request: Request, cid: str,
                     parsed: _Parsed) -> AsyncIterator[str]:
        """The server-sent events of a streamed completion (module docstring), then ``[DONE]``."""
        choice_of = {self._request_index(parsed, i): i for i in range(parsed.choices)}
        chunks = []
        for i in range(parsed.choices):
            prompt = parsed.prompt(i)
            echo_text, echo_tokens = self.echo(parsed, i)
            chunks.append(_sse(self.chunk(fmt, cid, fmt.start(i, echo_text, echo_tokens), {
                "event": "start", "index": i, "prompt_tokens": [self.decode_one(t) for t in prompt.ids],
                "prompt_length": len(prompt.ids), "length": len(prompt.ids) + prompt.window})))
        done: list[_Choice] = [self.choice(parsed, i, None) for i in range(parsed.choices)
                               if not parsed.prompt(i).window]
        chunks.extend(_sse(self.chunk(fmt, cid, fmt.done(c, parsed.logprobs is not None),
                                      {"event": "done", "index": c.index, **c.esolm})) for c in done)
        yield "".join(chunks)
        failed = False
        if job is not None:
            async for batch in job.batches(request):  # every event arrived by now, written as one chunk
                chunk = []
                for rindex, event in batch:
                    index = choice_of[rindex]
                    if isinstance(event, StepEvent):
                        chunk.append(_sse(self.chunk(fmt, cid, fmt.step(index), self.step_info(index, event))))
                        continue
                    try:
                        c = self.choice(parsed, index, event)
                    except ApiError as e:
                        job.cancel()
                        chunk.append(_sse({"error": {**e.body["error"], "param": None}}))
                        failed = True
                        break
                    done.append(c)
                    chunk.append(_sse(self.chunk(fmt, cid, fmt.done(c, parsed.logprobs is not None),
                                                 {"event": "done", "index": index, **c.esolm})))
                yield "".join(chunk)
                if failed:
                    break
        if parsed.include_usage and not failed and len(done) == parsed.choices:
            yield _sse({"id": cid, "object": fmt.chunk_object, "created": int(time.time()), "model": self.model_name,
                        "choices": [], "usage": self.usage(parsed, done)})
        yield _sse("[DONE]")

    # ---------------------------------------------------------------- responses
    def decode_one(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def top_dict(self, top: TopLogprobs) -> dict[str, float]:
        """OpenAI's ``{token text: log-probability}``, most likely first (two ids of one text: the likelier)."""
        out: dict[str, float] = {}
        for i, v in top:
            out.setdefault(self.decode_one(i), v)
        return out

    def chunk(self, fmt: _TextFormat, cid: str, choice: dict, esolm: dict) -> dict:
        return {"id": cid, "object": fmt.chunk_object, "created": int(time.time()), "model": self.model_name,
                "choices": [choice], "esolm": esolm}

    def step_info(self, index: int, event: StepEvent) -> dict:
        info = {"event": "step", "index": index, "step": event.step, "phase": event.phase,
                "positions": event.positions, "tokens": event.tokens,
                "token_texts": [self.decode_one(t) for t in event.tokens], "nfe": event.step + 1}
        if event.logprobs is not None:
            info["token_logprobs"] = event.logprobs
            info["top_logprobs"] = [self.top_dict(t) for t in event.top_logprobs]
        return info

    def tokens(self, ids: list[int], logprobs: list, tops: list, base: int) -> list[_Tok]:
        """The log-probability tokens of ``ids``, their text offsets from ``base`` (the length of the text decoded
        before each)."""
        before = self.tokenizer.decode_batch([ids[:j] for j in range(len(ids))])
        return [_Tok(t, self.decode_one(t), lp, top, base + len(pre))
                for t, lp, top, pre in zip(ids, logprobs, tops, before)]

    def echo(self, parsed: _Parsed, index: int) -> tuple[str, list[_Tok] | None]:
        """The echoed prompt text of choice ``index`` ("" without echo) and its log-probability tokens (None
        without logprobs)."""
        if not parsed.echo:
            return "", None
        ids = parsed.prompt(index).ids
        text = self.tokenizer.decode(ids)
        if parsed.scores is None:
            return text, None
        score = parsed.scores[index // parsed.n]
        return text, self.tokens(ids, score.logprobs, score.top_logprobs, 0)

    def choice(self, parsed: _Parsed, index: int, event: Finished | None) -> _Choice:
        """Choice ``index`` finished (``event`` None: its prompt generates nothing): its texts after the
        stop-string cut, reason and log-probabilities. ApiError when its decoding failed."""
        if event is not None and event.finish_reason not in ("stop", "length"):
            why = event.error or f"the request was {event.finish_reason}"
            raise ApiError(500 if event.finish_reason == "error" else 503, f"decoding failed: {why}",
                           type_="server_error", code=event.finish_reason)
        prompt = parsed.prompt(index)
        echo_text, echo_tokens = self.echo(parsed, index)
        window = [] if event is None else event.tokens[:prompt.max_tokens]  # the suffix's tokens are not returned
        generated = self.generated(window)
        text, stopped = _cut_at_stop(self.tokenizer.decode(window), parsed.stop)
        reason = "stop" if stopped else "length" if event is None else event.finish_reason
        toks: list[_Tok] = []
        if parsed.logprobs is not None and event is not None:
            toks = self.tokens(window[:generated], event.logprobs[:generated], event.top_logprobs[:generated],
                               len(echo_text))
            if stopped:  # the tokens that begin before the cut
                toks = [t for t in toks if t.offset - len(echo_text) < len(text)]
        info = {"nfe": 0, "seconds": 0.0, "tokens_per_second": None}
        if event is not None:
            info = {"nfe": event.nfe, "seconds": event.seconds,
                    "tokens_per_second": generated / event.seconds if event.seconds > 0 else None}
            if self.metrics is not None:
                self.metrics.request_nfe.observe(event.nfe)
        return _Choice(index, echo_text, text, reason, echo_tokens or [], toks, generated, info)

    def generated(self, tokens: list[int]) -> int:
        """Tokens generated: up to and including the first EOS (the cut fills the rest with EOS)."""
        eos = self.tokenizer.eos_id
        return tokens.index(eos) + 1 if eos in tokens else len(tokens)

    def models(self) -> dict:
        engine = self.engine
        info = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "esolm",
                "esolm": {"method": engine.method.to_dict(), "length": self.length, "max_batch": engine.max_batch,
                          "max_queue": engine.max_queue, "max_n": self.max_choices,
                          "chat_template": self.chat_template is not None}}
        return {"object": "list", "data": [info]}

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, **dict(self.engine.stats)}

    # ---------------------------------------------------------------- tokenizer routes (vLLM's)
    def tokenize(self, body: TokenizeBody) -> dict:
        """``/tokenize``: the ids of a text as ``/v1/completions`` encodes a text prompt (special-token strings
        are plain text; ``add_special_tokens`` puts the BOS first), except that a text that is exactly the name of
        a special token ``/tokenizer_info`` lists is that token (how a client looks up the special ids)."""
        self._check_model(body.model)
        tok = self.tokenizer
        special = self.specials.get(body.prompt)
        ids = [special] if special is not None else tok.encode_text(body.prompt, "the text")
        if body.add_special_tokens:
            ids = [tok.bos_id, *ids]
        return {"tokens": ids, "count": len(ids), "max_model_len": self.length}

    def detokenize(self, body: DetokenizeBody) -> dict:
        self._check_model(body.model)
        ids = [check_integer(t, "token id", 0, self.vocab_size - 1) for t in body.tokens]
        return {"prompt": self.tokenizer.decode(ids, skip_special_tokens=False)}

    def tokenizer_info(self) -> dict:
        tok = self.tokenizer
        return {"tokenizer_class": "esolm.Tokenizer", "name": tok.name, "vocab_size": self.vocab_size,
                "model_max_length": self.length, "bos_token": self.decode_one(tok.bos_id),
                "eos_token": self.decode_one(tok.eos_id), "pad_token": self.decode_one(tok.pad_id),
                "mask_token": self.decode_one(tok.mask_id), "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                "pad_token_id": tok.pad_id, "mask_token_id": tok.mask_id, "chat_template": self.chat_template}


def _sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else _json(obj)}\n\n"


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The 422 of a body that is not JSON, not an object, or has a field of the wrong type."""
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": "invalid"}
    kind = err.get("type")
    loc = [str(x) for x in err.get("loc", ())][1:]  # after "body"
    if kind == "json_invalid":
        why = (err.get("ctx") or {}).get("error", "cannot be decoded")
        where = f" at position {loc[0]}" if loc else ""
        return ApiError(422, f"the body is not valid JSON: {why}{where}", code=kind)
    if not loc:
        message = ("the body is missing: send a JSON object" if kind == "missing" else
                   f"the body must be a JSON object (content-type: application/json): {err['msg']}")
        return ApiError(422, message, code=kind)
    return ApiError(422, f"{_clip('.'.join(loc))}: {err['msg']}", code=kind, param=loc[0])


def create_app(engine, *, model_name: str, tokenizer, max_body_bytes: int = MAX_BODY_BYTES, api_key: str | None = None,
               chat_template: str | None = None) -> FastAPI:
    """A FastAPI app serving ``engine`` (an :class:`esolm.serving.engine.Engine`) under ``model_name``
    through a :class:`CompletionService`; ``tokenizer`` (an :class:`esolm.data.tokenizers.Tokenizer`) turns
    text into ids and back; request bodies over ``max_body_bytes`` are refused (413); with ``api_key``, the API
    routes need it as a bearer token (401); ``chat_template`` (Jinja; default the tokenizer's) serves
    ``/v1/chat/completions``. Prometheus metrics at ``/metrics`` (the app sets ``engine.step_observer``). The
    app's lifespan starts the engine thread and drains it on shutdown (requests that come meanwhile get 503)."""
    max_body_bytes = check_integer(max_body_bytes, "max_body_bytes", 1)
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip() or api_key != api_key.strip()):
        raise UserError("the API key must be a non-empty string without surrounding whitespace")
    service = CompletionService(engine, tokenizer, model_name, chat_template)
    metrics = service.metrics = _Metrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, drain=True)

    app = FastAPI(title="esolm", lifespan=lifespan)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(_Auth, key=api_key)
    app.add_middleware(metrics.middleware)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response({"Retry-After": "1"} if exc.status == 429 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code)).response()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        return await service.complete(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        return await service.complete(body, request)

    @app.get("/v1/models")
    async def models():
        return service.models()

    async def off_loop(fn, body):
        try:
            return await asyncio.to_thread(fn, body)
        except EsoLMError as e:
            raise ApiError(400, one_line(e)) from None

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody):
        return await off_loop(service.tokenize, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody):
        return await off_loop(service.detokenize, body)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return service.tokenizer_info()

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        index = STATIC / "index.html"
        if not index.is_file():
            raise ApiError(404, "the trace page is not installed", code="not_found")
        return FileResponse(index, media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return app


__all__ = ["create_app", "CompletionBody", "ChatBody", "CompletionService", "ApiError", "MAX_BODY_BYTES",
           "compile_chat_template"]
