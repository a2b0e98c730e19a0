"""lm-eval's own ``local-completions`` model (``lm_eval.models.openai_completions``) over HTTP against ``esolm
serve`` gets the loglikelihoods, ``is_greedy`` flags, rolling loglikelihoods and greedy generations of
``--model esolm`` in process (``esolm.integrations.lm_eval.EsoLMLM``) on the same float64 tiny Eso-LM (B):
requests of the shipped offline task pack and hand-made ones.

The API model finds the server's tokenizer routes by itself (``tokenizer_backend`` auto: ``/tokenizer_info``,
``/tokenize``), sends token ids, and scores with ``echo``, ``logprobs: 1``, ``max_tokens: 1``.
"""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from esolm.data.tokenizers import bpe8k  # noqa: E402
from esolm.integrations import TASKS_DIR  # noqa: E402
from esolm.integrations.lm_eval import EsoLMLM  # noqa: E402
from esolm.io import save_pretrained  # noqa: E402
from esolm.likelihood import exact_logits  # noqa: E402
from test_server import ESOLM, start_serve, stop, tiny_model  # noqa: E402

LENGTH = 64
KEY = "lm-eval-key"
SEED = 1234  # the seed local-completions sends (its default); EsoLMLM gets it as a model_arg


@pytest.fixture(scope="module")
def tok():
    return bpe8k()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tok):
    """(folder, base url) of ``esolm serve`` of a float64 tiny Eso-LM (B) saved with the shipped 8k BPE."""
    folder = tmp_path_factory.mktemp("lmeval_http") / "model"
    save_pretrained(tiny_model(ESOLM, tok, length=LENGTH), folder, method=ESOLM, tokenizer=tok)
    proc, url = start_serve(folder, "--name", "tiny", "--api-key", KEY, "--max-batch", "4")
    try:
        yield folder, url
    finally:
        stop(proc)


@pytest.fixture
def models(served, monkeypatch):
    folder, url = served
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as its bearer token
    api = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model="tiny", max_length=LENGTH, auth_token=KEY,
                              max_retries=1)
    assert api.tokenizer_backend == "remote" and api.tokenized_requests  # found /tokenizer_info and /tokenize
    ours = EsoLMLM(pretrained=str(folder), seed=SEED, temperature=0.0)
    assert ours.model.vocab_embed.embedding.dtype == torch.float64
    return api, ours


def task_requests(name: str, limit: int) -> list[Instance]:
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"num_docs": limit})
    task = tm.load(name)["tasks"][name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return list(task.instances)


def greedy_request(ours: EsoLMLM) -> Instance:
    """A context and the one token the model finds most likely after it (a request whose is_greedy is True)."""
    tok = ours.tok
    for context in ("The river", "Music and", "A long war", "The city of"):
        ids = tok.encode_text(context)
        with torch.no_grad():
            logits = exact_logits(ours.model, ours.method, torch.tensor([ids + [0]]))[0, -1]
        logits[tok.mask_id] = -torch.inf
        for t in logits.topk(5).indices.tolist():
            text = tok.decode([t])
            if tok.encode_text(context + text) == ids + [t]:  # lm-eval's split gives this token back
                return Instance("loglikelihood", {}, (context, text), 0)
    raise AssertionError("no context whose greedy token re-encodes to itself")


def test_loglikelihood_over_http_is_esolm_in_process(models):
    api, ours = models
    requests = task_requests("esolm_wiki_choice", 4)
    assert len(requests) >= 12 and {r.request_type for r in requests} == {"loglikelihood"}
    requests += [Instance("loglikelihood", {}, ("", "The river city"), 0),  # scored after the BOS
                 Instance("loglikelihood", {}, ("Music", " and art of the north"), 0), greedy_request(ours)]
    want = ours.loglikelihood(requests)
    got = api.loglikelihood(requests)
    assert len(got) == len(want)
    for (a, greedy_a), (b, greedy_b) in zip(got, want):
        assert abs(a - b) <= 1e-6, (a, b)
        assert greedy_a == greedy_b
    assert got[-1][1] is True and any(not g for _, g in got)


def test_rolling_and_generation_over_http_are_esolm_in_process(models):
    api, ours = models
    rolling = [Instance("loglikelihood_rolling", {}, (text,), i)
               for i, text in enumerate(["The river city of Paris is old.", "Music and art of the early modern age"])]
    assert api.loglikelihood_rolling(rolling) == pytest.approx(ours.loglikelihood_rolling(rolling), abs=1e-6)
    gens = task_requests("esolm_wiki_next", 3)
    assert {r.request_type for r in gens} == {"generate_until"}
    got = api.generate_until(gens)
    assert got == ours.generate_until(gens)  # greedy, one seed: the same plan and the same tokens
    assert any(got)


def test_registering_esolm_keeps_lm_evals_own_models():
    """``esolm lm-eval --model local-completions``: lm-eval fills its registry lazily, only while it is empty, so
    registering ``esolm`` first used to hide every built-in model ("no model for this name found")."""
    code = ("import esolm.integrations.lm_eval; from lm_eval.api.registry import get_model; "
            "print(get_model('local-completions').__name__, get_model('esolm').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["LocalCompletionsAPI", "EsoLMLM"]
