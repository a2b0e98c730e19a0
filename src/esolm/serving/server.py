"""HTTP front of the serving engine (FastAPI): OpenAI-style completions, streamed one event per decoding step.

Routes:

* ``POST /v1/completions`` — OpenAI fields ``prompt`` (text; the model's BOS is put before it), ``max_tokens``
  (default: the rest of the model's length), ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``stream``;
  esolm fields ``alpha0``, ``steps``, ``schedule``, ``infill`` (completion-relative position -> text, whose
  tokens are given from that position on). Choice ``i`` uses seed ``seed + i``, so it is exactly the sample
  ``esolm.generate`` draws alone with that seed. ``stop`` strings cut the final text (diffusion decodes out
  of order, so decoding is never stopped early by them).
* ``stream: true`` — server-sent events, each ``data: <json>``: a ``start`` event per choice, a ``step`` event
  per decoding step (the positions and tokens it decided), a ``done`` event per choice carrying the full
  text, then ``data: [DONE]``. Concatenating ``choices[0].text`` over the events gives the completion text.
* ``GET /v1/models``, ``GET /health`` (engine statistics), ``GET /`` (the trace page) and ``/static/*``.

Errors are JSON ``{"error": {"message", "type", "code", "param"}}``: 422 for a body of the wrong shape or
types, 400 for values the model cannot serve (checked by the engine before anything is queued), 404 for
another model's name, 429 when the engine's queue is full, 500 when a request fails while decoding.
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

from esolm.errors import EsoLMError, UserError
from esolm.sampling.params import SamplingParams
from esolm.serving.engine import CompletionRequest, Finished, QueueFull, StepEvent

STATIC = Path(__file__).resolve().parent / "static"
MAX_CHOICES = 16  # most choices (n) per request; also at most the engine's queue
_json = json.JSONEncoder(check_circular=False).encode  # json.dumps' output, without the cycle check
MAX_STOP = 4  # most stop strings, as OpenAI
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there

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


class ApiError(Exception):
    """An HTTP error with OpenAI's JSON body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self, headers: dict | None = None) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "code": self.code, "param": self.param}
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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


def create_app(engine, *, model_name: str, tokenizer) -> FastAPI:
    """A FastAPI app serving ``engine`` (an :class:`esolm.serving.engine.Engine`) under ``model_name``;
    ``tokenizer`` (an :class:`esolm.data.tokenizers.Tokenizer`) turns text into ids and back. The app's
    lifespan starts the engine thread and drains it on shutdown."""
    model = engine.model
    length = model.config.length
    max_choices = min(MAX_CHOICES, engine.max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, drain=True)

    app = FastAPI(title="esolm", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response({"Retry-After": "1"} if exc.status == 429 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": "invalid"}
        loc = [str(x) for x in err.get("loc", ())][1:]  # after "body"
        message = f"{'.'.join(loc)}: {err['msg']}" if loc else err["msg"]
        return ApiError(422, message, code=err.get("type"), param=loc[0] if loc else None).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code)).response()

    texts: dict[int, str] = {}  # token id -> its text alone (filled as tokens first appear; event loop only)
    relays: list[_Relay] = []  # the relay of the running event loop

    def decode_one(token: int) -> str:
        text = texts.get(token)
        if text is None:
            text = texts[token] = tokenizer.decode([token], skip_special_tokens=False)
        return text

    def relay() -> _Relay:
        loop = asyncio.get_running_loop()
        if not relays or relays[0].loop is not loop:
            relays[:] = [_Relay(loop)]
        return relays[0]

    def envelope(cid: str, index: int, text: str, finish_reason: str | None, esolm: dict) -> dict:
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
                "esolm": esolm}

    def parse(body: CompletionBody) -> tuple[list[CompletionRequest], list[str]]:
        """The engine requests of ``body`` (one per choice) and its stop strings; UserError/ApiError for
        values the model cannot serve, before anything is queued."""
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"model {body.model!r} is not served here (this server serves {model_name!r})",
                           code="model_not_found", param="model")
        if not 1 <= body.n <= max_choices:
            raise UserError(f"n must be an integer in [1, {max_choices}], got {body.n}")
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
        infill = None
        if body.infill:
            infill = {}
            for key, text in body.infill.items():
                try:
                    rel = int(key)
                except ValueError:
                    raise UserError(f"infill keys must be completion positions (integers), got {key!r}") from None
                ids = tokenizer.encode_text(text, f"the infill text at {key}")
                if not ids:
                    raise UserError(f"infill text at {key} encodes to no tokens")
                if rel < 0 or rel + len(ids) > max_tokens:
                    raise UserError(f"infill text at {key} ({len(ids)} tokens) does not fit in the completion "
                                    f"positions [0, {max_tokens})")
                for j, tok in enumerate(ids, start=p + rel):
                    if j in infill:
                        raise UserError(f"infill texts overlap at completion position {j - p}")
                    infill[j] = tok
        requests = [engine.check(CompletionRequest(prompt_ids, max_tokens, SamplingParams.from_request(body, i),
                                                   infill)) for i in range(body.n)]
        return requests, stop

    def finish(event: Finished, stop: list[str]) -> tuple[str, str]:
        """The text of a finished choice after the stop-string cut, and its finish reason."""
        if event.finish_reason not in ("stop", "length"):
            why = event.error or f"the request was {event.finish_reason}"
            raise ApiError(500 if event.finish_reason == "error" else 503, f"decoding failed: {why}",
                           type_="server_error", code=event.finish_reason)
        text, stopped = _cut_at_stop(tokenizer.decode(event.tokens), stop)
        return text, "stop" if stopped else event.finish_reason

    def generated(tokens: list[int]) -> int:
        """Tokens generated: up to and including the first EOS (the cut fills the rest with EOS)."""
        eos = tokenizer.eos_id
        return tokens.index(eos) + 1 if eos in tokens else len(tokens)

    def done_info(event: Finished) -> dict:
        n = generated(event.tokens)
        return {"nfe": event.nfe, "seconds": event.seconds,
                "tokens_per_second": n / event.seconds if event.seconds > 0 else None}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        try:
            requests, stop = parse(body)
        except EsoLMError as e:
            raise ApiError(400, _one_line(e)) from None
        job = _Job(engine, relay(), steps_wanted=body.stream)
        try:
            job.submit(requests)
        except QueueFull as e:
            raise ApiError(429, _one_line(e), type_="rate_limit_error", code="queue_full") from None
        except EsoLMError as e:
            raise ApiError(400, _one_line(e)) from None
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(_stream(job, request, cid, requests, stop), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(job.cancel))
        results: dict[int, Finished] = {}
        async for batch in job.batches(request):
            results.update(batch)
        if len(results) < len(requests):  # the client left
            return JSONResponse({}, status_code=499)
        choices, completion_tokens = [], 0
        for i in range(len(requests)):
            text, reason = finish(results[i], stop)
            completion_tokens += generated(results[i].tokens)
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason,
                            "esolm": done_info(results[i])})
        p = len(requests[0].prompt_ids)
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": choices,
                "usage": {"prompt_tokens": p, "completion_tokens": completion_tokens,
                          "total_tokens": p + completion_tokens}}

    async def _stream(job: _Job, request: Request, cid: str, requests: list[CompletionRequest],
                      stop: list[str]) -> AsyncIterator[str]:
        def sse(obj) -> str:
            return f"data: {obj if isinstance(obj, str) else _json(obj)}\n\n"

        prompt = requests[0].prompt_ids
        prompt_texts = [decode_one(t) for t in prompt]
        yield "".join(sse(envelope(cid, i, "", None, {
            "event": "start", "index": i, "prompt_tokens": prompt_texts, "prompt_length": len(prompt),
            "length": len(prompt) + req.max_tokens})) for i, req in enumerate(requests))
        failed = False
        async for batch in job.batches(request):  # every event arrived by now, written as one chunk
            chunk = []
            for index, event in batch:
                if isinstance(event, StepEvent):
                    chunk.append(sse(envelope(cid, index, "", None, {
                        "event": "step", "index": index, "step": event.step, "phase": event.phase,
                        "positions": event.positions, "tokens": event.tokens,
                        "token_texts": [decode_one(t) for t in event.tokens], "nfe": event.step + 1})))
                    continue
                try:
                    text, reason = finish(event, stop)
                except ApiError as e:
                    job.cancel()
                    chunk.append(sse({"error": {"message": e.message, "type": e.type, "code": e.code,
                                                "param": None}}))
                    failed = True
                    break
                chunk.append(sse(envelope(cid, index, text, reason, {"event": "done", "index": index,
                                                                     **done_info(event)})))
            yield "".join(chunk)
            if failed:
                break
        yield sse("[DONE]")

    @app.get("/v1/models")
    async def models():
        info = {"id": model_name, "object": "model", "created": created, "owned_by": "esolm",
                "esolm": {"method": engine.method.to_dict(), "length": length, "max_batch": engine.max_batch,
                          "max_queue": engine.max_queue, "max_n": max_choices}}
        return {"object": "list", "data": [info]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **dict(engine.stats)}

    @app.get("/", include_in_schema=False)
    async def page():
        index = STATIC / "index.html"
        if not index.is_file():
            raise ApiError(404, "the trace page is not installed", code="not_found")
        return FileResponse(index, media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return app


__all__ = ["create_app", "CompletionBody"]
