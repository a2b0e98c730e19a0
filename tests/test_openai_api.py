"""``esolm serve`` through the official ``openai`` SDK: one real server subprocess for the module (a tiny float32
Eso-LM (B) with a small BPE tokenizer that carries a chat template, an API key required). Texts are compared
with ``esolm.generate`` alone (same float32 weights, one thread, as the server); log-probabilities with the
library's exact likelihoods of the same weights in float64, within float32 tolerance.
"""

import math

import jinja2
import openai
import pytest
import torch

from esolm.cli import main
from esolm.commands.serve import API_KEY_ENV, _api_key
from esolm.errors import UserError
from esolm.io import load_model, save_pretrained
from esolm.likelihood import exact_token_logprobs
from esolm.rl.trajectory import Rollouts, trajectory_logprobs
from esolm.sampling.api import free_positions, generate, prepare
from esolm.sampling.params import SamplingParams
from test_server import AR, ESOLM, HTTP, alone, serving, start_serve, stop, tiny_model, tiny_tokenizer

KEY = "sk-esolm-test-key"
LENGTH = 64
TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
TOL = 2e-4  # float32 logits against the float64 reference, per token (log-probabilities of order -6)


@pytest.fixture(scope="module")
def tok():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def served(tmp_path_factory, tok):
    """(base url, the served float32 model, its float64 copy) of ``esolm serve --api-key``."""
    folder = tmp_path_factory.mktemp("openai") / "model"
    save_pretrained(tiny_model(ESOLM, tok, length=LENGTH, dtype=torch.float32), folder, method=ESOLM, tokenizer=tok)
    proc, url = start_serve(folder, "--max-batch", "4", "--name", "tiny", "--api-key", KEY)
    try:
        model = load_model(folder).model
        assert model.vocab_embed.embedding.dtype == torch.float32
        yield url, model, load_model(folder).model.double()
    finally:
        stop(proc)


@pytest.fixture(autouse=True)
def _one_thread():
    """The server decodes on one thread (--threads 1); its float32 references do too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=f"{served[0]}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def create(client, **kw):
    return client.completions.create(model="tiny", **kw)


def esolm_of(chunk) -> dict:
    return chunk.model_extra["esolm"]


# ---- completions ----

def test_completion_stream_and_extensions(served, client, tok):
    _, model, _ = served
    out = create(client, prompt="the cat sat", max_tokens=12, seed=5, temperature=0.8, top_p=0.9,
                 extra_body={"steps": 5, "alpha0": 0.5})
    assert out.object == "text_completion" and out.model == "tiny" and len(out.choices) == 1
    text = out.choices[0].text
    assert text == alone(model, ESOLM, tok, "the cat sat", 12, seed=5, temperature=0.8, top_p=0.9, steps=5,
                         alpha0=0.5)
    assert out.choices[0].logprobs is None and out.usage.prompt_tokens == len(tok.encode_prompt("the cat sat"))
    chunks = list(create(client, prompt="the cat sat", max_tokens=12, seed=5, temperature=0.8, top_p=0.9,
                         extra_body={"steps": 5, "alpha0": 0.5}, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text  # what an OpenAI client concatenates
    assert [esolm_of(c)["event"] for c in chunks] == ["start"] + ["step"] * (len(chunks) - 2) + ["done"]
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    usage = list(create(client, prompt="the cat sat", max_tokens=12, seed=5, stream=True,
                        stream_options={"include_usage": True}))[-1]
    assert usage.choices == [] and usage.usage.prompt_tokens == out.usage.prompt_tokens


def test_n_batched_prompts_and_stop(served, client, tok):
    _, model, _ = served
    prompts = ["the cat", "dogs ran over"]
    out = create(client, prompt=prompts, n=2, max_tokens=10, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]  # choice i * n + j: choice j of prompt i
    for c in out.choices:
        assert c.text == alone(model, ESOLM, tok, prompts[c.index // 2], 10, seed=7 + c.index % 2)
    assert out.usage.prompt_tokens == sum(len(tok.encode_prompt(p)) for p in prompts)
    streamed = {}
    for chunk in create(client, prompt=prompts, n=2, max_tokens=10, seed=7, stream=True):
        streamed[chunk.choices[0].index] = streamed.get(chunk.choices[0].index, "") + chunk.choices[0].text
    assert streamed == {c.index: c.text for c in out.choices}
    text = out.choices[0].text
    assert len(text) >= 4
    stop_at = text[2:4]
    cut = create(client, prompt=prompts[0], max_tokens=10, seed=7, stop=[stop_at, "\x00never"], logprobs=0).choices[0]
    assert cut.text == text[:text.find(stop_at)] and cut.finish_reason == "stop"
    full = create(client, prompt=prompts[0], max_tokens=10, seed=7, logprobs=0).choices[0].logprobs
    kept = cut.logprobs  # the tokens that begin before the cut
    assert kept.text_offset == [o for o in full.text_offset if o < len(cut.text)]
    assert kept.token_logprobs == full.token_logprobs[:len(kept.text_offset)]


def test_token_id_prompts_are_taken_as_given(served, client, tok):
    ids = tok.encode_prompt("small birds")
    text = create(client, prompt="small birds", max_tokens=8, seed=3).choices[0].text
    assert create(client, prompt=ids, max_tokens=8, seed=3).choices[0].text == text
    out = create(client, prompt=[ids, ids[1:]], max_tokens=8, seed=3)  # no BOS put before token ids
    assert out.choices[0].text == text
    assert out.usage.prompt_tokens == 2 * len(ids) - 1
    for bad, what in (([tok.vocab_size], "token id"), ([5, tok.mask_id], "mask id"), ([[5], []], "empty"),
                      ([5] * (LENGTH + 1), "length"), ([], "empty list")):
        with pytest.raises(openai.BadRequestError, match=what):
            create(client, prompt=bad, max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError):
        create(client, prompt=[5, "a"], max_tokens=4)


def test_suffix_inserts_between_prompt_and_suffix(served, client, tok):
    _, model, _ = served
    p, suffix = tok.encode_prompt("the cat"), tok.encode_text(" green hills")
    out = create(client, prompt="the cat", suffix=" green hills", max_tokens=8, seed=9)
    given = {len(p) + 8 + j: t for j, t in enumerate(suffix)}  # the suffix's tokens end the completion window
    ref = generate(model, ESOLM, prompt_ids=[p], infill=given, max_length=len(p) + 8 + len(suffix), seed=9,
                   eos_id=tok.eos_id).tokens[0]
    assert out.choices[0].text == tok.decode(ref[len(p):len(p) + 8].tolist())
    assert out.usage.completion_tokens <= 8


# ---- log-probabilities ----

def rollout_logprobs(model64, p_ids, tokens, max_tokens, seed, temperature, top_p):
    """The exact per-token trajectory log-likelihood (float64) of a served Eso-LM (B) completion."""
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    req = prepare(model64, ESOLM, params, prompt_ids=[p_ids], max_length=len(p_ids) + max_tokens)
    plan = req.decoder.plan(free_positions(req.tokens, model64.config.mask_id, len(p_ids)), len(p_ids), req.params,
                            torch.Generator().manual_seed(seed))
    r = Rollouts(torch.tensor([p_ids + tokens]), plan.order, plan.bounds(), len(p_ids), None, temperature, top_p)
    with torch.no_grad():
        return trajectory_logprobs(model64, r)[0].tolist()


def test_logprobs_are_the_exact_trajectory_likelihood(served, client, tok):
    _, _, model64 = served
    body = dict(prompt="the cat", max_tokens=16, seed=2, temperature=0.9, top_p=0.95, logprobs=3)
    out = create(client, **body)
    choice = out.choices[0]
    assert choice.finish_reason == "length"  # no EOS: every position was drawn
    lp = choice.logprobs
    n = len(lp.tokens)
    assert n == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 16
    assert all(math.isfinite(v) and v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)  # the 3 likeliest, and the sampled token
    # the sampled token is listed (under its text: byte tokens that decode to one text show the likeliest)
    assert all(top[t] >= v for top, t, v in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(choice.text)
    # the stream carries the same numbers: per step for the tokens it decided, in full at the end
    chunks = list(create(client, stream=True, **body))
    drawn, by_step = {}, {}
    for c in chunks:
        e = esolm_of(c)
        if e["event"] == "step":
            drawn.update(zip(e["positions"], e["tokens"]))
            by_step.update(zip(e["positions"], e["token_logprobs"]))
    p_ids = tok.encode_prompt("the cat")
    tokens = [drawn[q] for q in range(len(p_ids), len(p_ids) + 16)]
    assert [by_step[q] for q in range(len(p_ids), len(p_ids) + 16)] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert chunks[-1].choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-6)
    want = rollout_logprobs(model64, p_ids, tokens, 16, 2, 0.9, 0.95)
    assert lp.token_logprobs == pytest.approx(want, abs=TOL)
    assert sum(lp.token_logprobs) == pytest.approx(sum(want), abs=16 * TOL)


def test_echo_scores_the_prompt_exactly(served, client, tok):
    _, _, model64 = served
    ids = tok.encode_prompt("the cat sat on a mat while dogs ran")
    out = create(client, prompt=[ids], max_tokens=0, echo=True, logprobs=2)
    choice = out.choices[0]
    assert choice.text == tok.decode(ids) and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    with torch.no_grad():
        want, best = exact_token_logprobs(model64, ESOLM, torch.tensor([ids]))
    assert lp.token_logprobs[1:] == pytest.approx(want[0, 1:].tolist(), abs=TOL)
    for j in range(1, len(ids)):
        greedy = lp.token_logprobs[j] == max(lp.top_logprobs[j].values())  # lm-eval's is_greedy test
        assert greedy == bool(best[0, j])
    # echo with a completion: the prompt's text and scores, then the completion's
    plain = create(client, prompt=[ids], max_tokens=6, seed=4, logprobs=1).choices[0]
    echoed = create(client, prompt=[ids], max_tokens=6, seed=4, logprobs=1, echo=True).choices[0]
    assert echoed.text == tok.decode(ids) + plain.text
    assert echoed.logprobs.token_logprobs == lp.token_logprobs + plain.logprobs.token_logprobs
    assert echoed.logprobs.text_offset[len(ids):] == [len(tok.decode(ids)) + o for o in plain.logprobs.text_offset]
    chunks = list(create(client, prompt=[ids], max_tokens=6, seed=4, logprobs=1, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == echoed.text  # the prompt comes with the start event
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(echoed.logprobs.token_logprobs, abs=1e-6)
    scored_only = list(create(client, prompt=[ids], max_tokens=0, echo=True, logprobs=2, stream=True))
    assert [esolm_of(c)["event"] for c in scored_only] == ["start", "done"]
    assert scored_only[0].choices[0].text == choice.text and scored_only[-1].choices[0].finish_reason == "length"


# ---- chat ----

def rendered(messages) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE).render(messages=messages, add_generation_prompt=True)


def test_chat_completions_render_the_template(served, client, tok):
    _, model, _ = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, seed=3, logprobs=True,
                                         top_logprobs=2)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    content = out.choices[0].message.content
    assert content == alone(model, ESOLM, tok, rendered(messages), 10, seed=3)
    assert out.usage.prompt_tokens == len(tok.encode_prompt(rendered(messages)))
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob
               for e in entries)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, seed=3, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    parts = [{"role": "user", "content": [{"type": "text", "text": "the cat"}, {"type": "text", "text": " sat"}]}]
    assert client.chat.completions.create(model="tiny", messages=parts, max_tokens=10, seed=3).choices[0] \
        .message.content == alone(model, ESOLM, tok, rendered([{"role": "user", "content": "the cat sat"}]), 10, seed=3)
    with pytest.raises(openai.BadRequestError, match="text content"):
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_chat_without_a_template_and_suffix_on_ar_are_400(tok):
    """In-process servers of a tokenizer without a chat template (and an AR model, which cannot insert)."""
    bare = tiny_tokenizer()
    assert bare.chat_template is None
    with serving(tiny_model(AR, bare, length=32), AR, bare, max_batch=2) as (url, _):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as c:
            with pytest.raises(openai.BadRequestError, match="this model's tokenizer has no chat template"):
                c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.BadRequestError, match="suffix .* needs a diffusion model"):
                c.completions.create(model="tiny", prompt="the", suffix=" cat", max_tokens=4)
            assert c.completions.create(model="tiny", prompt="the", max_tokens=4, logprobs=1).choices[0].logprobs


# ---- errors, key, metrics, tokenizer routes ----

@pytest.mark.parametrize("kw,match", [
    ({"logprobs": 6}, "logprobs"),
    ({"max_tokens": 0}, "echo"),
    ({"max_tokens": 0, "echo": True, "suffix": " x"}, "suffix"),
    ({"max_tokens": LENGTH}, "max_tokens"),
    ({"n": 17}, "n must"),
    ({"prompt": ["a"] * 20, "n": 4}, "max-queue"),
])
def test_bad_values_are_400(client, kw, match):
    with pytest.raises(openai.BadRequestError, match=match):
        create(client, **{"prompt": "the cat", "max_tokens": 4, **kw})


def test_the_api_key_guards_the_api_only(served):
    url = served[0]
    for key in (None, "wrong"):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        r = HTTP.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "\n" not in r.json()["error"]["message"] and r.headers["www-authenticate"] == "Bearer"
        assert HTTP.post(f"{url}/tokenize", json={"prompt": "a"}, headers=headers).status_code == 401
        assert HTTP.get(f"{url}/v1/models", headers=headers).status_code == 401
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.completions.create(model="tiny", prompt="a", max_tokens=2)
    for path in ("/health", "/", "/metrics"):
        assert HTTP.get(f"{url}{path}").status_code == 200
    r = HTTP.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2},
                  headers={"Authorization": f"bearer {KEY}"})  # the scheme is case-insensitive
    assert r.status_code == 200


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics(served, client):
    url = served[0]
    before = HTTP.get(f"{url}/metrics").text
    create(client, prompt="the cat", max_tokens=5, seed=1)
    HTTP.post(f"{url}/v1/completions", json={"prompt": "a"})  # no key: 401
    text = HTTP.get(f"{url}/metrics").text
    ok = 'esolm_http_requests_total{route="/v1/completions",status="200"}'
    assert metric(text, ok) == metric(before, ok) + 1
    assert metric(text, 'esolm_http_requests_total{route="/v1/completions",status="401"}') >= 1
    assert metric(text, "esolm_tokens_generated_total") >= metric(before, "esolm_tokens_generated_total") + 5
    assert metric(text, "esolm_step_seconds_count") > metric(before, "esolm_step_seconds_count")
    assert metric(text, "esolm_request_nfe_count") == metric(before, "esolm_request_nfe_count") + 1
    for gauge in ("esolm_queue_depth", "esolm_active_slots", "esolm_nfe_total", "esolm_engine_steps_total"):
        assert f"\n{gauge} " in text


def test_tokenizer_routes(served, tok):
    url, auth = served[0], {"Authorization": f"Bearer {KEY}"}
    info = HTTP.get(f"{url}/tokenizer_info", headers=auth).json()
    assert info["eos_token"] == "<|endoftext|>" and info["eos_token_id"] == tok.eos_id
    assert info["model_max_length"] == LENGTH and info["chat_template"] == TEMPLATE

    def tokenize(text, **kw):
        return HTTP.post(f"{url}/tokenize", json={"prompt": text, **kw}, headers=auth).json()["tokens"]

    assert tokenize("the cat sat") == tok.encode_text("the cat sat")
    assert tokenize("<|endoftext|>") == [tok.eos_id]  # a special token's name: how clients look up its id
    assert tokenize(" <|endoftext|>") == tok.encode_text(" <|endoftext|>")  # in text: plain text
    assert tokenize("the", add_special_tokens=True) == tok.encode_prompt("the")
    ids = tok.encode_text("dogs ran")
    r = HTTP.post(f"{url}/detokenize", json={"tokens": ids}, headers=auth)
    assert r.json()["prompt"] == "dogs ran"
    assert HTTP.post(f"{url}/detokenize", json={"tokens": [10**6]}, headers=auth).status_code == 400


def test_api_key_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv(API_KEY_ENV, "k1")
    assert _api_key(None) == "k1" and _api_key("k2") == "k2"
    monkeypatch.setenv(API_KEY_ENV, "")
    assert _api_key(None) is None
    with pytest.raises(UserError, match="--api-key"):
        _api_key(" ")
    assert main(["serve", "/nonexistent", "--api-key", " k"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_a_chat_template_that_does_not_compile_is_refused_before_loading(tmp_path, capsys):
    bad = tmp_path / "t.jinja"
    bad.write_text("{% for m in messages %}")
    assert main(["serve", "/nonexistent", "--chat-template", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "chat template" in err and "nonexistent" not in err


def test_the_chat_template_travels_with_the_tokenizer(tmp_path, tok):
    """Saved in esolm_tokenizer.json and in a training checkpoint's tokenizer meta; absent, the meta (and so the
    tokenizer's fingerprint, part of data-cache keys) is what it was."""
    from esolm.data.tokenizers import Tokenizer
    from esolm.io.pretrained import _embedded_tokenizer

    assert Tokenizer.load(tok.save(tmp_path / "t")).chat_template == TEMPLATE
    embedded = _embedded_tokenizer({"tokenizer_json": tok.backend.to_str(), "tokenizer_meta": tok.meta()}, "ckpt")
    assert embedded.chat_template == TEMPLATE
    bare = tiny_tokenizer()
    assert "chat_template" not in bare.meta() and Tokenizer.load(bare.save(tmp_path / "b")).chat_template is None
    with pytest.raises(UserError, match="chat template"):
        Tokenizer(bare.backend, "x", bare.mask_id, bare.eos_id, bare.bos_id, chat_template="\ud800")
