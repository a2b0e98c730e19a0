"""The decoding-trace page: offline trace events, ``esolm sample --trace-html``, and the page itself in a real
headless browser (Debian's Chromium driven by Playwright; skipped with a reason when absent), offline and
against the live server."""

import json
import os
import random
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from esolm import cli
from esolm.data.tokenizers import train_bpe
from esolm.io import load_pretrained, save_pretrained
from esolm.methods import model_config_for
from esolm.model.backbone import DiT
from esolm.sampling.api import generate
from esolm.sampling.schedule import plan_binomial, plan_one_per_step, plan_strided
from esolm.serving.trace import events_from_generation, render_trace_html, write_trace_html

WORDS = "the a river city old new king music war north south early modern language people land sea".split()
LENGTH = 24
PROMPT = "the old king"
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny BPE tokenizer and tiny Eso-LM (B) / AR / MDLM models saved with it."""
    root = tmp_path_factory.mktemp("trace")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(120)]
    tok = train_bpe(texts, vocab_size=300, name="tiny-bpe")
    models = {}
    for name, method in {"eso": {"name": "esolm", "variant": "B", "alpha0": 0.5}, "ar": {"name": "ar"},
                         "mdlm": {"name": "mdlm"}}.items():
        cfg = model_config_for(method, vocab_size=tok.vocab_size, mask_id=tok.mask_id if name != "ar" else None,
                               hidden_size=32, cond_dim=16, n_layers=2, n_heads=2, length=LENGTH)
        torch.manual_seed(1)
        model = DiT(cfg)
        for p in model.parameters():  # away from the zero-initialised output: non-trivial predictions
            p.data.add_(0.05 * torch.randn_like(p))
        save_pretrained(model, root / name, method=method)
        tok.save(root / name)
        models[name] = root / name
    return {"root": root, "tok": tok, "models": models}


def step_events(events):
    return [e["esolm"] for e in events if e["esolm"]["event"] == "step"]


def embedded_events(html: str) -> list[dict]:
    m = re.search(r"<script>window\.ESOLM_TRACE = (.*?);</script>", html, re.S)
    assert m is not None
    return json.loads(m.group(1))


def check_events(events, tokens, prompt_length, nfe):
    """The stream schema: start, one step per call (positions partition the completion), done."""
    assert [e["esolm"]["event"] for e in events] == ["start"] + ["step"] * nfe + ["done"]
    start, done = events[0]["esolm"], events[-1]["esolm"]
    assert start["prompt_length"] == prompt_length and start["length"] == len(tokens)
    assert len(start["prompt_tokens"]) == prompt_length
    steps = step_events(events)
    assert [s["step"] for s in steps] == list(range(nfe)) and [s["nfe"] for s in steps] == list(range(1, nfe + 1))
    decided = sorted(p for s in steps for p in s["positions"])
    assert decided == list(range(prompt_length, len(tokens)))
    for s in steps:
        assert s["tokens"] == [tokens[p] for p in s["positions"]]
        assert len(s["token_texts"]) == len(s["tokens"]) and s["phase"] in ("diffusion", "sequential")
    assert done["nfe"] == nfe
    return steps


# ---- events_from_generation: the stream's events for one traced sample ----

@pytest.mark.parametrize("alpha0,sampler", [(0.5, "auto"), (0.25, "first_hitting"), (1.0, "auto"), (0.5, "strided")])
def test_esolm_events_follow_the_trace(workspace, alpha0, sampler):
    model, method = load_pretrained(workspace["models"]["eso"])
    tok = workspace["tok"]
    prompt = [tok.bos_id, *tok.encode(PROMPT)]
    out = generate(model, method, num_samples=3, prompt_ids=prompt, steps=5, alpha0=alpha0, sampler=sampler,
                   seed=4, trace=True)
    # the plan generate drew (its first use of a generator seeded like this one): the true sequential phase
    free = torch.ones(3, LENGTH, dtype=torch.bool)
    free[:, :len(prompt)] = False
    gen = torch.Generator().manual_seed(4)
    plan = {"auto": lambda: plan_binomial(free, 5, alpha0, gen),
            "first_hitting": lambda: plan_one_per_step(free, alpha0, gen),
            "strided": lambda: plan_strided(free, 5, alpha0, False, gen)}[sampler]()
    assert plan.nfe == out.nfe
    for i in range(3):
        events = events_from_generation(out, tok, sample=i)
        steps = check_events(events, out.tokens[i].tolist(), len(prompt), out.nfe)
        phases = [s["phase"] for s in steps]
        assert phases == [plan.phase(lo) for lo, _ in plan.bounds()]  # the plan's phases, exactly
        seq = [s for s in steps if s["phase"] == "sequential"]
        if alpha0 == 1.0:
            assert not seq
        else:  # diffusion calls first, then the plan's sequential positions one per call, left to right
            assert phases == sorted(phases)
            assert [s["positions"] for s in seq] == [[q] for q in plan.order[i, plan.diffusion_end:].tolist()]
        assert events[-1]["choices"][0]["text"] == tok.decode(out.tokens[i, len(prompt):].tolist())


def test_ar_and_mdlm_events(workspace):
    tok = workspace["tok"]
    model, method = load_pretrained(workspace["models"]["ar"])
    out = generate(model, method, num_samples=2, bos_id=tok.bos_id, seed=1, trace=True)
    steps = check_events(events_from_generation(out, tok, sample=1), out.tokens[1].tolist(), 1, out.nfe)
    assert [s["positions"] for s in steps] == [[p] for p in range(1, LENGTH)]
    assert {s["phase"] for s in steps} == {"sequential"}
    model, method = load_pretrained(workspace["models"]["mdlm"])  # ancestral: (row, position) pairs
    out = generate(model, method, num_samples=2, steps=6, seed=2, trace=True)
    for i in range(2):
        steps = step_events(events_from_generation(out, tok, sample=i))
        assert sorted(p for s in steps for p in s["positions"]) == list(range(LENGTH))
        assert len(steps) == out.nfe and {s["phase"] for s in steps} == {"diffusion"}


def test_events_are_embedded_safely(tmp_path):
    hostile = '</script><script>window.PWNED = 1</script>\u2028<!--'
    events = [{"esolm": {"event": "start", "index": 0, "prompt_tokens": [hostile], "prompt_length": 1,
                         "length": 2}, "choices": [{"index": 0, "text": ""}]}]
    html = render_trace_html(events, title="a <b> & c")
    assert embedded_events(html) == events
    assert "<title>a &lt;b&gt; &amp; c</title>" in html
    assert html.count("</script>") == 2  # the events' and the inlined trace.js'
    path = write_trace_html(tmp_path / "x.html", events)
    assert path.read_text(encoding="utf-8") == render_trace_html(events)


# ---- esolm sample --trace-html ----

@pytest.fixture(scope="module")
def sampled(workspace):
    """``esolm sample --trace-html`` once: the JSONL rows and the page."""
    root = workspace["root"]
    out, page = root / "s.jsonl", root / "trace.html"
    rc = cli.main([str(a) for a in ["sample", workspace["models"]["eso"], "--num-samples", 3, "--steps", 5,
                                    "--prompt", PROMPT, "--seed", 2, "--out", out, "--trace-html", page]])
    assert rc == 0
    return [json.loads(ln) for ln in out.read_text().splitlines()], page


def test_sample_trace_html_is_the_first_sample(workspace, sampled):
    tok = workspace["tok"]
    rows, page = sampled
    events = embedded_events(page.read_text(encoding="utf-8"))
    p = 1 + len(tok.encode(PROMPT))
    check_events(events, rows[0]["token_ids"], p, rows[0]["nfe"])
    assert events[-1]["choices"][0]["text"] == tok.decode(rows[0]["token_ids"][p:])


def test_sample_trace_html_of_speculative_decoding(workspace, tmp_path):
    """Speculative calls are typed steps too: the page shows each call's finalised positions, the plan's
    diffusion calls first, then the verified sequential calls (fewer calls than positions)."""
    tok = workspace["tok"]
    out, page = tmp_path / "s.jsonl", tmp_path / "t.html"
    rc = cli.main(["sample", str(workspace["models"]["eso"]), "--speculative", "3", "--alpha0", "0.25", "--steps",
                   "4", "--num-samples", "1", "--seed", "3", "--prompt", PROMPT, "--trace-html", str(page), "--out",
                   str(out)])
    assert rc == 0
    row = json.loads(out.read_text().splitlines()[0])
    events = embedded_events(page.read_text(encoding="utf-8"))
    p = 1 + len(tok.encode(PROMPT))
    steps = check_events(events, row["token_ids"], p, row["nfe"])
    phases = [s["phase"] for s in steps]
    assert phases == sorted(phases) and phases[-1] == "sequential"
    assert row["nfe"] < LENGTH - p  # verified drafts: fewer calls than one per position
    assert events[-1]["choices"][0]["text"] == tok.decode(row["token_ids"][p:])


# ---- the page in headless Chromium ----

@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("ESOLM_REQUIRE_BROWSER"):  # set by .ci/run: CI must run the browser tests
            pytest.fail("ESOLM_REQUIRE_BROWSER is set but Debian's chromium is not installed")
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page whose console errors and uncaught exceptions are collected in ``page.errors``."""
    pg = browser.new_page(viewport={"width": 1100, "height": 700})
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    pg.close()


def tiles(page) -> list[dict]:
    return page.eval_on_selector_all("#tiles .tile", """els => els.map(t => ({
        cls: t.className, text: t.textContent, step: t.dataset.step, phase: t.dataset.phase,
        colour: getComputedStyle(t).backgroundColor}))""")


def check_drawn(page, nfe, prompt_length, length):
    """Every completion tile filled and coloured by its step: NFE distinct colours; prompt tiles grey."""
    drawn = tiles(page)
    assert len(drawn) == length
    prompt, completion = drawn[:prompt_length], drawn[prompt_length:]
    assert all("prompt" in t["cls"] and t["step"] is None for t in prompt)
    assert all("decided" in t["cls"] and t["text"] != "" and t["step"] is not None for t in completion)
    assert len({t["colour"] for t in completion}) == nfe == len({t["step"] for t in completion})
    by_step = {}
    for t in completion:  # one colour per step
        by_step.setdefault(t["step"], set()).add(t["colour"])
    assert all(len(c) == 1 for c in by_step.values())
    assert page.inner_text("#nfe") == f"NFE {nfe}"
    assert page.inner_text("#legend-last") == f"step {nfe}"
    return completion


@needs_browser
def test_offline_trace_page_in_chromium(sampled, page):
    html = sampled[1]
    events = embedded_events(html.read_text(encoding="utf-8"))
    steps = step_events(events)
    nfe, p = len(steps), events[0]["esolm"]["prompt_length"]
    page.goto(html.as_uri())
    assert page.is_hidden("#form") and page.is_visible("#replay")
    completion = check_drawn(page, nfe, p, LENGTH)
    phase_of = {p: s["phase"] for s in steps for p in s["positions"]}
    assert [t["phase"] for t in completion] == [phase_of[i] for i in range(p, LENGTH)]
    assert [int(t["step"]) for t in completion] == [s["step"] for i in range(p, LENGTH)
                                                    for s in steps if i in s["positions"]]
    for phase in ("diffusion", "sequential"):
        mine = [s for s in steps if s["phase"] == phase]
        n_steps, n_tok = len(mine), sum(len(s["positions"]) for s in mine)
        assert page.inner_text(f"#legend-{phase}") == (f"{phase}: {n_steps} step{'' if n_steps == 1 else 's'}, "
                                                      f"{n_tok} token{'' if n_tok == 1 else 's'}")
    assert page.text_content("#text") == events[-1]["choices"][0]["text"]
    page.hover(f"#tiles .tile >> nth={LENGTH - 1}")
    assert page.inner_text("#info").startswith(f"position {LENGTH - 1} · step ")
    page.click("#replay")  # the animation ends in the same drawing
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=20000)
    check_drawn(page, nfe, p, LENGTH)
    assert page.errors == []


@needs_browser
def test_hostile_token_text_is_shown_not_run(tmp_path, page):
    hostile = '</script><script>window.PWNED = 1</script>'
    chunk = {"object": "text_completion", "choices": [{"index": 0, "text": "", "finish_reason": None}]}
    events = [dict(chunk, esolm={"event": "start", "index": 0, "prompt_tokens": ["<b>x</b>"], "prompt_length": 1,
                                 "length": 2}),
              dict(chunk, esolm={"event": "step", "index": 0, "step": 0, "phase": "diffusion", "positions": [1],
                                 "tokens": [7], "token_texts": [hostile], "nfe": 1}),
              {**chunk, "choices": [{"index": 0, "text": hostile, "finish_reason": "length"}],
               "esolm": {"event": "done", "index": 0, "nfe": 1, "seconds": 0.5, "tokens_per_second": 2.0}}]
    page.goto(write_trace_html(tmp_path / "h.html", events).as_uri())
    assert page.evaluate("window.PWNED") is None
    assert [t["text"] for t in tiles(page)] == ["<b>x</b>", hostile]
    assert page.inner_text("#tps") == "2.0 tok/s"
    assert page.errors == []


# ---- the live page against the real server ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(workspace):
    """The real app (engine + FastAPI) under uvicorn on a free loopback port, in a thread."""
    import uvicorn

    from esolm.serving import Engine
    from esolm.serving.server import create_app

    model, method = load_pretrained(workspace["models"]["eso"])
    tok = workspace["tok"]
    engine = Engine(model, method, max_batch=4, eos_id=tok.eos_id, bos_id=tok.bos_id)
    engine.start()
    app = create_app(engine, model_name="tiny-eso", tokenizer=tok)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)
    engine.shutdown(drain=False, timeout=30)


@needs_browser
def test_live_page_streams_a_generation(live_server, page):
    page.goto(live_server + "/")
    assert page.is_visible("#form") and page.is_hidden("#replay")
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "12")
    page.fill("#steps", "4")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60000)
    drawn = tiles(page)
    p = sum("prompt" in t["cls"] for t in drawn)
    assert p >= 2 and len(drawn) == p + 12
    nfe = int(page.inner_text("#nfe").split()[1])
    check_drawn(page, nfe, p, p + 12)
    assert re.fullmatch(r"\d+(\.\d+)? tok/s", page.inner_text("#tps"))
    if os.environ.get("ESOLM_SCREENSHOT"):
        shot = ROOT / "benchmarks" / "results" / "serve_trace.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
    assert page.errors == []
    page.fill("#max-tokens", "1000")  # longer than the model: the server's 4xx message is shown
    page.click("#generate")
    page.wait_for_selector("#status.error", timeout=30000)
    assert re.match(r"HTTP 4\d\d: \S", page.inner_text("#status"))
    assert all(e.startswith("Failed to load resource") for e in page.errors)  # the browser logs the 4xx itself
    assert len(tiles(page)) == p + 12  # the last drawing stays
