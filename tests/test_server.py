"""``esolm serve``'s HTTP server, run for real (uvicorn on a free loopback port) with an httpx client.

The models are tiny random Eso-LM (B) and AR networks in float64 with a small BPE tokenizer; every served
completion is compared with ``esolm.generate`` decoding the same request alone with the same seed.
"""

import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import torch
import uvicorn

from esolm.cli import main
from esolm.data.tokenizers import train_bpe
from esolm.io import save_pretrained
from esolm.methods import as_method, model_config_for
from esolm.model.backbone import DiT
from esolm.sampling.api import generate
from esolm.serving.engine import Engine
from esolm.serving.server import STATIC, create_app

ESOLM = as_method({"name": "esolm", "variant": "B", "alpha0": 0.25, "batch_split": 0.5, "low_var": False})
AR = as_method({"name": "ar"})
LENGTH = 512  # long enough for requests that are still decoding when a test acts on them
WORDS = "the cat sat on a mat while dogs ran over green hills and small birds sang old songs".split()


def tiny_tokenizer():
    rng = random.Random(0)
    return train_bpe([" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(40)], vocab_size=300,
                     name="tiny-bpe")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny_model(method, tok, seed=0, length=LENGTH, dtype=torch.float64):
    mask = {} if method.name == "ar" else {"mask_id": tok.mask_id}
    cfg = model_config_for(method, vocab_size=tok.vocab_size, hidden_size=32, cond_dim=16, n_layers=2, n_heads=2,
                           length=length, **mask)
    torch.manual_seed(seed)
    return DiT(cfg).randomize_zero_init(0.2).to(dtype).eval()


@contextmanager
def serving(model, method, tok, **engine_kw):
    """The real server on a free loopback port in a background thread; yields (base url, engine)."""
    engine = Engine(model, method, eos_id=tok.eos_id, bos_id=tok.bos_id, **engine_kw)
    app = create_app(engine, model_name="tiny", tokenizer=tok)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def esolm_server(tok):
    model = tiny_model(ESOLM, tok)
    with serving(model, ESOLM, tok, max_batch=4, max_queue=32) as (url, engine):
        yield url, engine, model


@pytest.fixture(scope="module")
def ar_server(tok):
    model = tiny_model(AR, tok, seed=1)
    with serving(model, AR, tok, max_batch=4, max_queue=32) as (url, engine):
        yield url, engine, model


def alone(model, method, tok, prompt, max_tokens, seed=0, **kw) -> str:
    """The completion text ``esolm.generate`` decodes for this request alone."""
    ids = tok.encode_prompt(prompt) if prompt else [tok.bos_id]
    p = len(ids)
    out = generate(model, method, prompt_ids=[ids], max_length=p + max_tokens, seed=seed, eos_id=tok.eos_id, **kw)
    return tok.decode(out.sequences()[0][p:])


HTTP = httpx.Client(timeout=60)  # one client for the file: each new client costs an SSL context


def post(url, body):
    return HTTP.post(f"{url}/v1/completions", json=body)


def stream_events(url, body) -> list:
    """Every ``data:`` payload of a streamed completion (JSON objects, then the string ``[DONE]``)."""
    out = []
    with HTTP.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_idle(url, timeout=20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = HTTP.get(f"{url}/health").json()
        if health["active"] == 0 and health["queued"] == 0:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.02)


def test_completion_is_generate_alone(esolm_server, tok):
    url, _, model = esolm_server
    body = {"prompt": "the cat sat", "max_tokens": 12, "seed": 5, "top_p": 0.9, "temperature": 0.8}
    r = post(url, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "tiny" and len(out["choices"]) == 1
    choice = out["choices"][0]
    assert choice["text"] == alone(model, ESOLM, tok, "the cat sat", 12, seed=5, top_p=0.9, temperature=0.8)
    assert choice["finish_reason"] in ("stop", "length") and choice["esolm"]["nfe"] >= 1
    p = len(tok.encode_prompt("the cat sat"))
    assert out["usage"]["prompt_tokens"] == p
    assert out["usage"]["total_tokens"] == p + out["usage"]["completion_tokens"]
    ids = tok.encode_prompt("the cat sat")
    seq = generate(model, ESOLM, prompt_ids=[ids], max_length=p + 12, seed=5, top_p=0.9, temperature=0.8,
                   eos_id=tok.eos_id).sequences()[0]
    assert out["usage"]["completion_tokens"] == len(seq) - p  # up to and including the first EOS


def test_stream_steps_partition_the_completion(esolm_server, tok):
    url, _, model = esolm_server
    body = {"prompt": "green hills", "max_tokens": 20, "seed": 4, "steps": 6, "alpha0": 0.5}  # no EOS drawn
    events = stream_events(url, body)
    assert events[-1] == "[DONE]"
    start, steps, done = events[0], events[1:-2], events[-2]
    p = len(tok.encode_prompt("green hills"))
    assert start["esolm"]["event"] == "start" and start["esolm"]["prompt_length"] == p
    assert start["esolm"]["length"] == p + 20 and len(start["esolm"]["prompt_tokens"]) == p
    assert [e["esolm"]["event"] for e in steps] == ["step"] * len(steps)
    assert [e["esolm"]["step"] for e in steps] == list(range(len(steps)))
    assert [e["esolm"]["nfe"] for e in steps] == list(range(1, len(steps) + 1))
    assert {e["esolm"]["phase"] for e in steps} <= {"diffusion", "sequential"}
    positions = [q for e in steps for q in e["esolm"]["positions"]]
    assert sorted(positions) == list(range(p, p + 20))  # every completion position decided exactly once
    assert all(len(e["esolm"]["tokens"]) == len(e["esolm"]["positions"]) == len(e["esolm"]["token_texts"])
               for e in steps)
    assert all(e["choices"][0]["text"] == "" and e["choices"][0]["finish_reason"] is None for e in events[:-2])
    assert done["esolm"]["event"] == "done" and done["esolm"]["nfe"] == len(steps)
    assert done["choices"][0]["finish_reason"] == "length"
    # the stream's text is the non-streamed text of the same request, and what an OpenAI client concatenates
    text = post(url, body).json()["choices"][0]["text"]
    assert done["choices"][0]["text"] == text == "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text == alone(model, ESOLM, tok, "green hills", 20, seed=4, steps=6, alpha0=0.5)


def test_concurrent_requests_are_each_generate_alone(esolm_server, tok):
    """8 requests at once (more than the 4 slots: requests join and leave between steps), each streamed or
    not, with different prompts, lengths, schedules and seeds: every text is that request decoded alone."""
    url, _, model = esolm_server
    prompts = ["the cat", "dogs ran over", "", "small birds sang old songs", "a mat", "the", "hills", "old"]
    bodies = [{"prompt": prompts[i], "max_tokens": 6 + 5 * i, "seed": 100 + i, "top_p": [None, 0.9][i % 2],
               "schedule": ["auto", "first_hitting"][i // 4 % 2]} for i in range(8)]

    def one(i):
        if i % 2:
            return stream_events(url, bodies[i])[-2]["choices"][0]["text"]
        return post(url, bodies[i]).json()["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    for body, text in zip(bodies, texts):
        kw = {k: v for k, v in body.items() if k not in ("prompt", "max_tokens", "schedule")}
        assert text == alone(model, ESOLM, tok, body["prompt"], body["max_tokens"], sampler=body["schedule"], **kw)
    wait_idle(url)


def test_n_choices_use_consecutive_seeds(esolm_server, tok):
    url, _, model = esolm_server
    out = post(url, {"prompt": "the cat", "max_tokens": 10, "n": 2, "seed": 7}).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert [c["text"] for c in out["choices"]] == [alone(model, ESOLM, tok, "the cat", 10, seed=s) for s in (7, 8)]
    events = stream_events(url, {"prompt": "the cat", "max_tokens": 10, "n": 2, "seed": 7})
    done = {e["esolm"]["index"]: e["choices"][0]["text"] for e in events[:-1] if e["esolm"]["event"] == "done"}
    assert done == {0: out["choices"][0]["text"], 1: out["choices"][1]["text"]}
    assert {e["esolm"]["index"] for e in events[:-1] if e["esolm"]["event"] == "start"} == {0, 1}


def test_infill_text_is_given_at_its_completion_positions(esolm_server, tok):
    url, _, model = esolm_server
    body = {"prompt": "the cat", "max_tokens": 16, "seed": 9, "infill": {"5": " green hills"}}
    p = len(tok.encode_prompt("the cat"))
    given = {p + 5 + j: t for j, t in enumerate(tok.encode(" green hills"))}
    text = post(url, body).json()["choices"][0]["text"]
    assert " green hills" in text
    assert text == alone(model, ESOLM, tok, "the cat", 16, seed=9, infill=given)
    events = stream_events(url, body)
    decided = [q for e in events[1:-2] for q in e["esolm"]["positions"]]
    assert events[-2]["choices"][0]["text"] == text
    assert sorted(decided + list(given)) == list(range(p, p + 16))  # given positions are never decoded


def test_stop_strings_cut_the_text(esolm_server):
    url, _, _ = esolm_server
    body = {"prompt": "the", "max_tokens": 24, "seed": 11}
    full = post(url, body).json()["choices"][0]
    text = full["text"]
    assert len(text) >= 4
    stop = text[2:4]
    cut = text[: text.find(stop)]
    for stops in (stop, [stop, "\x00never"]):
        out = post(url, {**body, "stop": stops}).json()["choices"][0]
        assert out["text"] == cut and out["finish_reason"] == "stop"
        done = stream_events(url, {**body, "stop": stops})[-2]["choices"][0]
        assert done["text"] == cut and done["finish_reason"] == "stop"
    out = post(url, {**body, "stop": "\x00never"}).json()["choices"][0]
    assert (out["text"], out["finish_reason"]) == (text, full["finish_reason"])


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": 5}, 422, "prompt"),
    ({"max_tokens": "5"}, 422, "max_tokens"),
    ({"max_tokens": 2.0}, 422, "max_tokens"),
    ({"stream": "yes"}, 422, "stream"),
    ({"temperature": "hot"}, 422, "temperature"),
    ({"stop": [1]}, 422, "stop"),
    ({"best_of": 2}, 422, "best_of"),
    ({"max_tokens": 0}, 400, None),
    ({"max_tokens": -3}, 400, None),
    ({"max_tokens": LENGTH}, 400, None),  # prompt + max_tokens longer than the model
    ({"prompt": "the cat sat " * 300}, 400, None),  # the prompt alone is longer than the model
    ({"n": 0}, 400, None),
    ({"n": 17}, 400, None),
    ({"top_p": 0.0}, 400, None),
    ({"top_p": 1.5}, 400, None),
    ({"temperature": -1.0}, 400, None),
    ({"schedule": "sideways"}, 400, None),
    ({"alpha0": 1.5}, 400, None),
    ({"alpha0": -0.1}, 400, None),
    ({"steps": 0}, 400, None),
    ({"stop": ["", "a"]}, 400, None),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, None),
    ({"infill": {"x": "cat"}}, 400, None),
    ({"infill": {"9": "cat"}, "max_tokens": 8}, 400, None),  # outside the completion
    ({"model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_are_refused_before_any_work(esolm_server, body, status, param):
    url, engine, _ = esolm_server
    before = HTTP.get(f"{url}/health").json()
    r = post(url, {"prompt": "the cat", "max_tokens": 8, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param
    after = HTTP.get(f"{url}/health").json()
    assert after["active"] == after["queued"] == 0 and after["steps"] == before["steps"]


def test_malformed_json_and_unknown_routes_get_json_errors(esolm_server):
    url, _, _ = esolm_server
    r = HTTP.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["message"]
    r = HTTP.post(f"{url}/v1/completions", content=b'{"temperature": NaN}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "temperature"
    r = HTTP.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_health_models_and_page(esolm_server):
    url, engine, model = esolm_server
    health = HTTP.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    models = HTTP.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["esolm"]["length"] == LENGTH and models["data"][0]["esolm"]["max_batch"] == 4
    r = HTTP.get(f"{url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text.lower()
    for asset in sorted(p.name for p in STATIC.iterdir() if p.suffix in (".js", ".css")):
        assert HTTP.get(f"{url}/static/{asset}").status_code == 200


def test_ar_model_serves_and_refuses_alpha0(ar_server, tok):
    url, _, model = ar_server
    body = {"prompt": "small birds", "max_tokens": 9, "seed": 2}
    text = post(url, body).json()["choices"][0]["text"]
    assert text == alone(model, AR, tok, "small birds", 9, seed=2)
    events = stream_events(url, body)
    steps = [e for e in events[:-1] if e["esolm"]["event"] == "step"]
    assert all(e["esolm"]["phase"] == "sequential" and len(e["esolm"]["positions"]) == 1 for e in steps)
    assert events[-2]["choices"][0]["text"] == text
    r = post(url, {**body, "alpha0": 0.5})
    assert r.status_code == 400 and "alpha0" in r.json()["error"]["message"]


LONG = {"prompt": "the", "max_tokens": LENGTH - 2, "schedule": "first_hitting"}  # hundreds of engine steps


def test_full_queue_is_429_and_a_disconnect_frees_the_slot(tok):
    model = tiny_model(ESOLM, tok, length=LENGTH)
    with serving(model, ESOLM, tok, max_batch=1, max_queue=1) as (url, engine), ThreadPoolExecutor(1) as pool:
        with HTTP.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as first:
            lines = first.iter_lines()
            while '"event": "step"' not in next(lines):
                pass  # the first request holds the only slot and is decoding
            queued = pool.submit(post, url, LONG)  # waits in the queue (its one place)
            deadline = time.monotonic() + 20
            while HTTP.get(f"{url}/health").json()["queued"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = post(url, {"prompt": "the", "max_tokens": 4})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert r.headers["retry-after"] == "1"
            steps_then = HTTP.get(f"{url}/health").json()["steps"]
        # leaving the `with` closed the connection mid-stream: the slot is freed at the next step, the queued
        # request runs, then all is idle
        done = queued.result()
        assert done.status_code == 200
        full = done.json()["choices"][0]["esolm"]["nfe"]  # the same request decoded to its end
        health = wait_idle(url)
        # one request per step: the first request made fewer steps than the same request run to its end
        assert steps_then < full and health["steps"] - full < full


def test_a_non_streaming_client_that_leaves_is_cancelled(tok):
    model = tiny_model(ESOLM, tok, length=LENGTH)
    with serving(model, ESOLM, tok, max_batch=1, max_queue=4) as (url, engine):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=0.1))
        left = wait_idle(url)["steps"]  # the engine stopped decoding it soon after the client left
        full = post(url, LONG).json()["choices"][0]["esolm"]["nfe"]  # the same request to its end
        assert left < full


def _export(tmp_path, tok, with_tokenizer=True, length=LENGTH):
    folder = tmp_path / ("model" if with_tokenizer else "bare")
    save_pretrained(tiny_model(ESOLM, tok, length=length, dtype=torch.float32), folder, method=ESOLM,
                    tokenizer=tok if with_tokenizer else None)
    return folder


def start_serve(folder, *args):
    """``esolm serve FOLDER ARGS`` in a subprocess on a free port, answering; returns (process, base url)."""
    proc = subprocess.Popen([sys.executable, "-m", "esolm.cli", "serve", str(folder), "--port", "0", "--threads",
                             "1", *map(str, args)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = ""
        while "http://" not in line:
            line = proc.stderr.readline()
            assert line, proc.stderr.read()
        url = line.split(" on ")[1].split()[0]
        # the rest of stderr (uvicorn's log of every request) is read in the background: a full pipe would
        # block the server
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        deadline = time.monotonic() + 60
        while True:
            try:
                if HTTP.get(f"{url}/health").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    except BaseException:
        stop(proc)
        raise


def stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_refuses_a_model_without_tokenizer(tmp_path, tok, capsys):
    assert main(["serve", str(_export(tmp_path, tok, with_tokenizer=False)), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("esolm serve: error:") and "tokenizer" in err and "\n" not in err


def test_sigterm_drains_the_request_in_flight(tmp_path, tok):
    """`esolm serve` gets SIGTERM while a streamed request is decoding: the request still completes (it
    provably finished after the signal), then the process exits cleanly (code 0)."""
    proc, url = start_serve(_export(tmp_path, tok), "--max-batch", "2")
    try:
        events = []
        t_sent = time.time()
        body = {**LONG, "max_tokens": 150, "stream": True}  # >= 150 steps after the first one
        with HTTP.stream("POST", f"{url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: "):])
                if len(events) == 2:  # start, first step: decoding is under way
                    t_signal = time.time()
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        done = json.loads(events[-2])
        assert done["esolm"]["event"] == "done" and done["choices"][0]["finish_reason"] in ("stop", "length")
        assert t_sent + done["esolm"]["seconds"] > t_signal  # it finished after SIGTERM
        assert proc.wait(60) == 0
    finally:
        stop(proc)
