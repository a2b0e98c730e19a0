"""Hostile requests to ``esolm serve`` (a real subprocess, one per module, with httpx) and hostile output paths
of ``esolm sample``: every case is refused or served at once, with a one-line error, and never blocks the
server for other clients.
"""

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from esolm.cli import main
from esolm.errors import UserError
from esolm.io import check_writable
from esolm.sampling.params import max_steps
from esolm.serving.server import MAX_BODY_BYTES, MAX_ECHO
from test_server import (
    ESOLM,
    HTTP,
    _export,
    serving,
    start_serve,
    stop,
    tiny_model,
    tiny_tokenizer,
)

LENGTH = 1024  # the served model: a completion of the whole length takes seconds (hundreds of steps)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def url(tmp_path_factory, tok):
    """The base URL of ``esolm serve`` of a tiny Eso-LM (B) model, in a subprocess shared by the module."""
    proc, base = start_serve(_export(tmp_path_factory.mktemp("hostile"), tok, length=LENGTH), "--max-batch", "4")
    try:
        yield base
    finally:
        stop(proc)


def post(url, body, **kw):
    return HTTP.post(f"{url}/v1/completions", json=body, **kw)


def error_of(r, status) -> dict:
    """The JSON error body of a response that must have ``status``."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"] and err["type"]
    return err


def timed(fn, *args, **kw):
    t = time.monotonic()
    out = fn(*args, **kw)
    return out, time.monotonic() - t


# ---- steps: bounded by the length; the largest accepted does not block other requests ----

def test_steps_beyond_the_length_bound_are_400_at_once(url):
    for body in ({"steps": 10**9}, {"schedule": "strided", "steps": 10**12}, {"steps": max_steps(10) + 1}):
        r, seconds = timed(post, url, {"prompt": "a", "max_tokens": 8, **body}, timeout=10)
        assert "steps" in error_of(r, 400)["message"] and seconds < 5
    assert HTTP.get(f"{url}/health").json()["active"] == 0


def test_the_largest_steps_accepted_do_not_block_other_requests(url):
    body = {"prompt": "the", "max_tokens": LENGTH - 2, "steps": max_steps(LENGTH), "stream": True}  # BOS + "the"
    with HTTP.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while '"event": "step"' not in next(lines):
            pass  # the long request is decoding
        for _ in range(3):
            health, seconds = timed(HTTP.get, f"{url}/health")
            assert health.status_code == 200 and seconds < 1
        small, seconds = timed(post, url, {"prompt": "a", "max_tokens": 8})
        assert small.status_code == 200 and seconds < 1
        while (active := HTTP.get(f"{url}/health").json()["active"]) == 2:
            pass  # the statistics count the small request until the end of its last step
        assert active == 1  # the long one is still decoding
    # leaving the stream cancelled it


# ---- bodies: too large -> 413 before parsing; parsing never on the event loop ----

def test_a_large_body_is_413_at_once_and_the_server_stays_responsive(url):
    big = "the cat " * (10 * 2**20 // 8)  # 10 MiB
    for body in ({"prompt": big}, {"prompt": "a", "infill": {"0": big[:2**21]}}, {"model": big[:2**21]}):
        r, seconds = timed(post, url, body)
        err = error_of(r, 413)
        assert err["code"] == "request_too_large" and str(MAX_BODY_BYTES) in err["message"] and seconds < 2
        assert len(r.content) < 1000
        assert HTTP.get(f"{url}/health").status_code == 200

    def chunked():  # no Content-Length: the limit applies to the bytes as they arrive
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"a" * 65536
        yield b'"}'

    r = HTTP.post(f"{url}/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert error_of(r, 413)["code"] == "request_too_large"
    assert HTTP.get(f"{url}/health").json()["active"] == 0


def test_tokenizing_a_body_within_the_limit_does_not_stall_the_server(url):
    """A prompt just within the body limit takes seconds to tokenize (then it is refused for its length):
    meanwhile /health keeps answering (the tokenizer runs in a worker thread and lets go of the GIL)."""
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        pending = pool.submit(post, url, {"prompt": "a" * (MAX_BODY_BYTES - 20)})
        latencies = []
        while not pending.done():
            latencies.append(timed(HTTP.get, f"{url}/health")[1])
        took = time.monotonic() - t0
        assert "tokens" in error_of(pending.result(), 400)["message"]
    assert len(latencies) >= 3 and max(latencies) < min(1.0, took / 2), (took, sorted(latencies)[-3:])


def test_parsing_runs_off_the_event_loop(tok):
    """Tokenizing a prompt or an infill text (seconds for a large one) never runs on the event loop."""

    class Recording:
        def __init__(self, inner):
            self.inner, self.on_loop = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def _record(self) -> None:
            try:
                asyncio.get_running_loop()
                self.on_loop.append(True)
            except RuntimeError:
                self.on_loop.append(False)

        def encode_prompt(self, *args, **kw):
            self._record()
            return self.inner.encode_prompt(*args, **kw)

        def encode_text(self, *args, **kw):
            self._record()
            return self.inner.encode_text(*args, **kw)

    recording = Recording(tok)
    model = tiny_model(ESOLM, tok, length=64)
    with serving(model, ESOLM, recording, max_batch=2, max_queue=4) as (url, _):
        r = post(url, {"prompt": "the cat", "max_tokens": 8, "infill": {"2": " dogs"}})
        assert r.status_code == 200, r.text
    assert recording.on_loop == [False, False]  # the prompt and the infill text, both in a worker thread


def test_max_body_bytes_is_refused_when_not_positive(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--max-body-bytes", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-body-bytes" in err and "must be an integer >= 1" in err


# ---- request values ----

def test_special_token_text_in_infill_is_plain_text(url, tok):
    """``<|endoftext|>`` as infill text is that text (13 plain tokens), not the EOS that would cut the
    completion at position 2 with finish_reason "stop"."""
    body = {"prompt": "the cat", "max_tokens": 20, "temperature": 0, "infill": {"2": "<|endoftext|>"}}
    out = post(url, body).json()
    choice = out["choices"][0]
    plain = tok.encode_text("<|endoftext|>")
    assert tok.eos_id not in plain and len(plain) > 1
    plain_run = post(url, {**body, "infill": None}).json()["choices"][0]
    assert choice["finish_reason"] == plain_run["finish_reason"] == "length"  # greedy draws no EOS here
    assert out["usage"]["completion_tokens"] == 20
    assert "<|endoftext|>" in choice["text"]


def test_temperatures_below_the_greedy_threshold_decode_greedily(url):
    base = {"prompt": "small birds", "max_tokens": 24, "seed": 5}  # the seed still draws the decoding order
    greedy = post(url, {**base, "temperature": 0})
    assert greedy.status_code == 200, greedy.text  # OpenAI semantics: 0 is greedy
    text = greedy.json()["choices"][0]["text"]
    assert text and greedy.json()["usage"]["completion_tokens"] == 24
    for t in (5e-324, 1e-300, 1e-6):
        choice = post(url, {**base, "temperature": t}).json()["choices"][0]
        assert choice["text"] == text and choice["finish_reason"] == "length", t
    assert post(url, {**base, "temperature": 1.0}).json()["choices"][0]["text"] != text  # sampling differs


# ---- error messages ----

def test_malformed_json_is_reported_as_such(url):
    for raw, position in ((b'{"prompt": "a",', 15), (b'{"prompt": "a"} x', 16), (b"{not json", 1)):
        r = HTTP.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
        err = error_of(r, 422)
        assert err["param"] is None and err["code"] == "json_invalid"
        assert "not valid JSON" in err["message"] and f"position {position}" in err["message"]
    for raw in (b"[1, 2]", b'"text"'):
        r = HTTP.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert "JSON object" in error_of(r, 422)["message"]


@pytest.mark.parametrize("body,status,param", [
    ({"model": "m" * 100_000}, 404, "model"),
    ({"k" * 100_000: 1}, 422, "k"),
    ({"infill": {"k" * 100_000: "a"}}, 400, None),
    ({"infill": {"k" * 100_000: 5}}, 422, "infill"),
    ({"infill": {"0" * 5000 + "1": "a"}}, 400, None),
])
def test_errors_do_not_echo_large_values(url, body, status, param):
    r = post(url, {"prompt": "a", "max_tokens": 8, **body})
    err = error_of(r, status)
    assert len(r.content) < 400 and "characters)" in err["message"]
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param) and len(err["param"]) < MAX_ECHO + 30


def test_sigterm_while_idle_exits_cleanly(tmp_path, tok):
    """An idle `esolm serve` exits with code 0 on SIGTERM; --max-body-bytes reaches the server."""
    proc, url = start_serve(_export(tmp_path, tok, length=64), "--max-body-bytes", 2048)
    try:
        assert post(url, {"prompt": "a", "max_tokens": 4, "user": "x" * 1900}).status_code == 200
        r = post(url, {"prompt": "a", "max_tokens": 4, "user": "x" * 2100})
        assert "2048" in error_of(r, 413)["message"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        stop(proc)


def test_requests_while_shutting_down_get_503(tok):
    """Once the engine drains (the app's shutdown), a new request gets 503 with the JSON error body, and the
    request in flight still completes."""
    model = tiny_model(ESOLM, tok, length=512)
    with serving(model, ESOLM, tok, max_batch=1, max_queue=4) as (url, engine), ThreadPoolExecutor(1) as pool:
        with HTTP.stream("POST", f"{url}/v1/completions",
                         json={"prompt": "the", "max_tokens": 300, "stream": True}) as r:
            lines = r.iter_lines()
            while '"event": "step"' not in next(lines):
                pass
            draining = pool.submit(engine.shutdown)  # what the app's lifespan does when the server stops
            deadline = time.monotonic() + 20
            while True:
                refused = post(url, {"prompt": "a", "max_tokens": 4})
                if refused.status_code != 200 or time.monotonic() > deadline:
                    break
            err = error_of(refused, 503)
            assert err["code"] == "shutting_down" and err["type"] == "server_error"
            assert json.loads([ln for ln in lines if ln.startswith("data: {")][-1][6:])["esolm"]["event"] == "done"
        draining.result()


# ---- esolm sample: output paths checked before any work ----

MISSING_MODEL = "/nonexistent/model"  # the outputs are checked before the model is even looked for


def sample_error(capsys, *args) -> str:
    assert main(["sample", MISSING_MODEL, *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("esolm sample: error:") and "\n" not in err and "nonexistent" not in err, err
    return err


def test_sample_refuses_unwritable_output_paths_before_work(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert "cannot write" in sample_error(capsys, "--out", out, "--trace-html", "/sys/t.html")
    assert "cannot write" in sample_error(capsys, "--out", out, "--summary", "/proc/x.json")
    long_name = tmp_path / ("t" * 300 + ".html")
    assert "too long" in sample_error(capsys, "--out", out, "--trace-html", long_name)
    # 250 characters fit a folder entry, but not with the atomic writer's temporary-name additions
    assert "too long" in sample_error(capsys, "--out", out, "--trace-html", tmp_path / ("t" * 245 + ".html"))
    assert "too long" in sample_error(capsys, "--out", tmp_path / ("d" * 300) / "s.jsonl")
    assert not list(tmp_path.iterdir())  # nothing was created (the checks' probes are gone)


def test_sample_refuses_one_path_for_two_outputs(tmp_path, capsys):
    same = tmp_path / "same.html"
    err = sample_error(capsys, "--out", same, "--trace-html", same)
    assert "--out" in err and "--trace-html" in err
    err = sample_error(capsys, "--out", tmp_path / "s.jsonl", "--summary", tmp_path / "x" / ".." / "s.jsonl")
    assert "--out" in err and "--summary" in err
    (tmp_path / "real.html").write_text("")
    os.symlink(tmp_path / "real.html", tmp_path / "link.html")
    err = sample_error(capsys, "--out", tmp_path / "s.jsonl", "--trace-html", tmp_path / "link.html", "--summary",
                       tmp_path / "real.html")
    assert "--trace-html" in err and "--summary" in err


@pytest.mark.parametrize("flag", ["--trace-html", "--summary"])
@pytest.mark.parametrize("value", ["", "-"])
def test_sample_refuses_empty_and_stdout_paths_for_files(tmp_path, capsys, flag, value):
    err = sample_error(capsys, "--out", tmp_path / "s.jsonl", flag, value)
    assert flag in err


def test_check_writable_probes_the_folder(tmp_path):
    with pytest.raises(UserError, match="cannot write"):
        check_writable("/sys/t.html")
    with pytest.raises(UserError, match="too long"):
        check_writable(tmp_path / ("x" * 300))
    with pytest.raises(UserError, match="too long"):
        check_writable(tmp_path / "new" / ("x" * 250), folder=True)
    with pytest.raises(UserError, match="empty"):
        check_writable("")
    with pytest.raises(UserError, match="stdout"):
        check_writable("-")
    assert check_writable(tmp_path / "a" / "b.json") == tmp_path / "a" / "b.json"
    assert check_writable(tmp_path / ("x" * 200)) == tmp_path / ("x" * 200)
    assert not list(tmp_path.iterdir())
