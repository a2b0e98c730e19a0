"""HTTP front of the serving engine (FastAPI): OpenAI-style completions, streamed one event per decoding step.

Routes:

* ``POST /v1/completions`` — OpenAI fields ``prompt`` (text; the model's BOS is put before it), ``max_tokens``
  (default: the rest of the model's length), ``temperature`` (0: greedy), ``top_p``, ``n``, ``stop``, ``seed``,
  ``stream``; esolm fields ``alpha0``, ``steps``, ``schedule``, ``infill`` (completion-relative position -> text, whose
  tokens are given from that position on). Choice ``i`` uses seed ``seed + i``, so it is exactly the sample
  ``esolm.generate`` draws alone with that seed. ``stop`` strings cut the final text (diffusion decodes out
  of order, so decoding is never stopped early by them).
* ``stream: true`` — server-sent events, each ``data: <json>``: a ``start`` event per choice, a ``step`` event
  per decoding step (the positions and tokens it decided), a ``done`` event per choice carrying the full
  text, then ``data: [DONE]``. Concatenating ``choices[0].text`` over the events gives the completion text.
* ``GET /v1/models``, ``GET /health`` (engine statistics), ``GET /`` (the trace page) and ``/static/*``.

Errors are JSON ``{"error": {"message", "type", "code", "param"}}``: 413 for a body over the server's limit
(``esolm serve --max-body-bytes``; refused before anything parses it), 422 for a body that is not JSON or of
the wrong shape or types, 400 for values the model cannot serve (checked, off the event loop, before
anything is queued), 404 for another model's name, 429 when the engine's queue is full, 503 while the
server shuts down, 500 when a request fails while decoding. Messages repeat at most the first
:data:`MAX_ECHO` characters of a client's value.
A client that disconnects has its requests cancelled, which frees their slots at the next engine step.
The engine thread starts with the app and is drained when it stops (uvicorn's graceful shutdown on SIGTERM
first lets in-flight requests finish).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from esolm.errors import EsoLMError, UserError, one_line
from esolm.sampling.params import SamplingParams, check_integer
from esolm.serving.engine import CompletionRequest, Finished, QueueFull, ShuttingDown, StepEvent

STATIC = Path(__file__).resolve().parent / "static"
MAX_CHOICES = 16  # most choices (n) per request; also at most the engine's queue
_json = json.JSONEncoder(check_circular=False).encode  # json.dumps' output, without the cycle check
MAX_STOP = 4  # most stop strings, as OpenAI
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there
MAX_BODY_BYTES = 1 << 20  # default largest request body (413 beyond it, before anything parses it)
DRAIN_BYTES = 16 << 20  # most bytes of a refused body read and dropped before the 413
MAX_ECHO = 64  # characters of a client's value an error message repeats
MAX_MESSAGE = 1000  # characters of an error message

Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Text = Annotated[str, Field(strict=True)]


class CompletionBody(BaseModel):
    """The JSON body of ``POST /v1/completions`` (types only; values are checked against the model)."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    prompt: Text = ""
    max_tokens: Int | None = None
    temperature: Float = 1.0
    top_p: Float | None = None
    n: Int = 1
    stop: Text | list[Text] | None = None
    seed: Int = 0
    stream: Annotated[bool, Field(strict=True)] = False
    user: Text | None = None
    alpha0: Float | None = None
    steps: Int | None = None
    schedule: Text = "auto"
    infill: dict[str, Text] | None = None


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


class CompletionService:
    """The completions API over one engine: a body becomes engine requests (:meth:`parse`), which are queued
    (:meth:`complete`) and answered as one OpenAI response or as a stream of events (:meth:`stream`).

    ``engine`` is an :class:`esolm.serving.engine.Engine`; ``tokenizer`` (an
    :class:`esolm.data.tokenizers.Tokenizer`) turns text into ids and back; ``model_name`` is the name served.
    :meth:`parse` is thread-safe (the app runs it in a worker thread: tokenizing a large prompt takes time);
    everything else runs on the event loop.
    """

    def __init__(self, engine, tokenizer, model_name: str):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.length = engine.model.config.length
        self.max_choices = min(MAX_CHOICES, engine.max_queue)
        self.created = int(time.time())
        self._texts: dict[int, str] = {}  # token id -> its text alone (filled as tokens first appear)
        self._relay: _Relay | None = None  # the relay of the running event loop

    # ---------------------------------------------------------------- requests
    def parse(self, body: CompletionBody) -> tuple[list[CompletionRequest], list[str]]:
        """The engine requests of ``body`` (one per choice) and its stop strings; UserError/ApiError for
        values the model cannot serve, before anything is queued."""
        tokenizer, length = self.tokenizer, self.length
        if body.model is not None and body.model != self.model_name:
            raise ApiError(404, f"model {_clip(repr(body.model))} is not served here (this server serves "
                                f"{self.model_name!r})", code="model_not_found", param="model")
        if not 1 <= body.n <= self.max_choices:
            raise UserError(f"n must be an integer in [1, {self.max_choices}], got {body.n}")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise UserError(f"stop must be up to {MAX_STOP} non-empty strings")
        prompt_ids = tokenizer.encode_prompt(body.prompt) if body.prompt else [tokenizer.bos_id]
        p = len(prompt_ids)
        if p >= length:
            raise UserError(f"the prompt is {p} tokens (with BOS) but the model's length is {length}: "
                            "nothing left to generate")
        max_tokens = length - p if body.max_tokens is None else body.max_tokens
        if not 1 <= max_tokens <= length - p:
            raise UserError(f"max_tokens must be an integer in [1, {length - p}] (the model's length {length} "
                            f"minus the prompt's {p} tokens), got {max_tokens}")
        infill = self._infill(body.infill, p, max_tokens) if body.infill else None
        requests = [self.engine.check(CompletionRequest(prompt_ids, max_tokens,
                                                        SamplingParams.from_request(body, i), infill))
                    for i in range(body.n)]
        return requests, stop

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

    async def complete(self, body: CompletionBody, request: Request):
        """Answer ``POST /v1/completions``: the body parsed off the event loop, its choices queued together,
        then the finished response (or, with ``stream``, the event stream)."""
        try:
            requests, stop = await asyncio.to_thread(self.parse, body)
        except EsoLMError as e:
            raise ApiError(400, one_line(e)) from None
        job = _Job(self.engine, self.relay(), steps_wanted=body.stream)
        try:
            job.submit(requests)
        except QueueFull as e:
            raise ApiError(429, one_line(e), type_="rate_limit_error", code="queue_full") from None
        except ShuttingDown as e:
            raise ApiError(503, one_line(e), type_="server_error", code="shutting_down") from None
        except EsoLMError as e:
            raise ApiError(400, one_line(e)) from None
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(self.stream(job, request, cid, requests, stop), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(job.cancel))
        results: dict[int, Finished] = {}
        async for batch in job.batches(request):
            results.update(batch)
        if len(results) < len(requests):  # the client left
            return JSONResponse({}, status_code=499)
        choices, completion_tokens = [], 0
        for i in range(len(requests)):
            text, reason = self.finish(results[i], stop)
            completion_tokens += self.generated(results[i].tokens)
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason,
                            "esolm": self.done_info(results[i])})
        p = len(requests[0].prompt_ids)
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices,
                "usage": {"prompt_tokens": p, "completion_tokens": completion_tokens,
                          "total_tokens": p + completion_tokens}}

    async def stream(self, job: _Job, request: Request, cid: str, requests: list[CompletionRequest],
                     stop: list[str]) -> AsyncIterator[str]:
        """The server-sent events of a streamed completion (module docstring), then ``[DONE]``."""
        prompt = requests[0].prompt_ids
        prompt_texts = [self.decode_one(t) for t in prompt]
        yield "".join(_sse(self.envelope(cid, i, "", None, {
            "event": "start", "index": i, "prompt_tokens": prompt_texts, "prompt_length": len(prompt),
            "length": len(prompt) + req.max_tokens})) for i, req in enumerate(requests))
        failed = False
        async for batch in job.batches(request):  # every event arrived by now, written as one chunk
            chunk = []
            for index, event in batch:
                if isinstance(event, StepEvent):
                    chunk.append(_sse(self.envelope(cid, index, "", None, {
                        "event": "step", "index": index, "step": event.step, "phase": event.phase,
                        "positions": event.positions, "tokens": event.tokens,
                        "token_texts": [self.decode_one(t) for t in event.tokens], "nfe": event.step + 1})))
                    continue
                try:
                    text, reason = self.finish(event, stop)
                except ApiError as e:
                    job.cancel()
                    chunk.append(_sse({"error": {**e.body["error"], "param": None}}))
                    failed = True
                    break
                chunk.append(_sse(self.envelope(cid, index, text, reason, {"event": "done", "index": index,
                                                                           **self.done_info(event)})))
            yield "".join(chunk)
            if failed:
                break
        yield _sse("[DONE]")

    # ---------------------------------------------------------------- responses
    def decode_one(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def envelope(self, cid: str, index: int, text: str, finish_reason: str | None, esolm: dict) -> dict:
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
                "esolm": esolm}

    def finish(self, event: Finished, stop: list[str]) -> tuple[str, str]:
        """The text of a finished choice after the stop-string cut, and its finish reason."""
        if event.finish_reason not in ("stop", "length"):
            why = event.error or f"the request was {event.finish_reason}"
            raise ApiError(500 if event.finish_reason == "error" else 503, f"decoding failed: {why}",
                           type_="server_error", code=event.finish_reason)
        text, stopped = _cut_at_stop(self.tokenizer.decode(event.tokens), stop)
        return text, "stop" if stopped else event.finish_reason

    def generated(self, tokens: list[int]) -> int:
        """Tokens generated: up to and including the first EOS (the cut fills the rest with EOS)."""
        eos = self.tokenizer.eos_id
        return tokens.index(eos) + 1 if eos in tokens else len(tokens)

    def done_info(self, event: Finished) -> dict:
        n = self.generated(event.tokens)
        return {"nfe": event.nfe, "seconds": event.seconds,
                "tokens_per_second": n / event.seconds if event.seconds > 0 else None}

    def models(self) -> dict:
        engine = self.engine
        info = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "esolm",
                "esolm": {"method": engine.method.to_dict(), "length": self.length, "max_batch": engine.max_batch,
                          "max_queue": engine.max_queue, "max_n": self.max_choices}}
        return {"object": "list", "data": [info]}

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, **dict(self.engine.stats)}


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


def create_app(engine, *, model_name: str, tokenizer, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI app serving ``engine`` (an :class:`esolm.serving.engine.Engine`) under ``model_name``
    through a :class:`CompletionService`; ``tokenizer`` (an :class:`esolm.data.tokenizers.Tokenizer`) turns
    text into ids and back; request bodies over ``max_body_bytes`` are refused (413). The app's lifespan
    starts the engine thread and drains it on shutdown (requests that come meanwhile get 503)."""
    max_body_bytes = check_integer(max_body_bytes, "max_body_bytes", 1)
    service = CompletionService(engine, tokenizer, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, drain=True)

    app = FastAPI(title="esolm", lifespan=lifespan)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)

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

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/", include_in_schema=False)
    async def page():
        index = STATIC / "index.html"
        if not index.is_file():
            raise ApiError(404, "the trace page is not installed", code="not_found")
        return FileResponse(index, media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return app


__all__ = ["create_app", "CompletionBody", "CompletionService", "ApiError", "MAX_BODY_BYTES"]
