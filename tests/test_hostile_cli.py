"""Bad input at the command line and at ``generate``: one line, exit 2 (or an esolm error), before any work.

Every command-line case runs through ``esolm.cli.main`` and must print exactly one stderr line
``esolm CMD: error: ...``; every ``generate`` case must raise an :class:`EsoLMError` (also a ``ValueError``)
without calling the network.
"""

import json
import math
import random
import shutil
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

from esolm import cli
from esolm.data.tokenizers import Tokenizer, train_bpe
from esolm.devices import resolve_device
from esolm.errors import EsoLMError, UserError
from esolm.evaluation import perplexity, samples
from esolm.io import save_pretrained
from esolm.methods import model_config_for
from esolm.model.backbone import DiT
from esolm.sampling import GenerationOutput, generate
from esolm.sampling.api import check_request

WORDS = "the a river city old new king music war north south early modern language people".split()
LENGTH = 32
ESO = {"name": "esolm", "variant": "B", "alpha0": 0.5}


def tiny_model(method, vocab, mask_id, seed=1):
    cfg = model_config_for(method, vocab_size=vocab, mask_id=mask_id, hidden_size=32, cond_dim=16, n_layers=1,
                           n_heads=2, length=LENGTH)
    torch.manual_seed(seed)
    model = DiT(cfg)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    rng = random.Random(0)
    texts = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(2))
             for _ in range(120)]
    data = root / "docs.txt"
    data.write_text("\n\n".join(texts) + "\n")
    tok = train_bpe(texts, vocab_size=300, name="tiny-bpe")
    models = {}
    for name, method in {"eso": ESO, "ar": {"name": "ar"}}.items():
        model = tiny_model(method, tok.vocab_size, tok.mask_id if name != "ar" else None)
        save_pretrained(model, root / name, method=method)
        tok.save(root / name)
        models[name] = root / name
    (root / "empty").mkdir()
    shutil.copytree(root / "eso", root / "broken")
    (root / "broken" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": [1, 2')
    (root / "afile").write_text("not a folder\n")
    return {"root": root, "tok": tok, "data": data, **models}


def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line(rc, err, command, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"esolm {command}: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------------
# Prompts


def test_non_utf8_prompt(ws, capsys):
    prompt = b"the \xff\xfe king".decode("utf-8", "surrogateescape")  # how undecodable argv bytes arrive
    rc, _, err = run_cli(["sample", ws["eso"], "--prompt", prompt, "--out", ws["root"] / "x.jsonl"], capsys)
    assert_one_line(rc, err, "sample", "not valid UTF-8", "0xff")
    with pytest.raises(UserError, match="not valid UTF-8"):  # the library boundary says the same
        ws["tok"].encode_prompt(prompt)


def test_empty_prompt(ws, capsys):
    rc, _, err = run_cli(["sample", ws["eso"], "--prompt", "", "--out", ws["root"] / "x.jsonl"], capsys)
    assert_one_line(rc, err, "sample", "prompt is empty")


@pytest.mark.parametrize("extra", [[], ["--max-length", "6"]])
def test_prompt_longer_than_the_samples(ws, capsys, extra):
    rc, _, err = run_cli(["sample", ws["eso"], "--prompt", "the old king " * 8, *extra,
                          "--out", ws["root"] / "x.jsonl"], capsys)
    assert_one_line(rc, err, "sample", "nothing left to generate")
    assert not (ws["root"] / "x.jsonl").exists()


@pytest.mark.parametrize("name", ["eso", "ar"])
def test_special_token_text_in_a_prompt_is_plain_text(ws, tmp_path, capsys, name):
    """``<|mask|>`` / ``<|endoftext|>`` in a prompt are encoded as ordinary text, never as the special ids,
    and the samples keep that text verbatim."""
    tok = ws["tok"]
    prompt = "the <|mask|> king <|endoftext|>"
    ids = tok.encode_prompt(prompt)
    assert ids[0] == tok.bos_id and tok.mask_id not in ids and tok.eos_id not in ids[1:]
    assert tok.decode(ids) == prompt
    assert tok.mask_id in tok.encode(prompt)  # plain encode() would have produced the mask id
    out = tmp_path / "s.jsonl"
    rc, _, err = run_cli(["sample", ws[name], "--prompt", prompt, "--num-samples", 2, "--steps", 2,
                          "--out", out], capsys)
    assert rc == 0, err
    for line in out.read_text().splitlines():
        row = json.loads(line)
        assert row["token_ids"][: len(ids)] == ids
        assert row["text"].startswith(prompt)


def test_prompt_that_can_only_encode_to_the_mask_is_refused():
    """A tokenizer whose mask is an ordinary word cannot encode that word as text: refused."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    vocab = {"<eos>": 0, "MASK": 1, "the": 2, "king": 3, "<unk>": 4}
    backend = HFTok(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = Tokenizer(backend, "words", mask_id=1, eos_id=0, bos_id=0)
    assert tok.encode_prompt("the king") == [0, 2, 3]
    with pytest.raises(UserError, match="mask token"):
        tok.encode_prompt("the MASK king")


# ------------------------------------------------------------------------------------------------------
# Sampling arguments


@pytest.mark.parametrize("argv, needle", [
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--num-samples", "0"], "--num-samples"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--alpha0", "inf"], "--alpha0"),
    (["--sampler", "nope"], "sampler 'nope'"),
    (["--shuffle"], "shuffle"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**62)], "seed must be an integer in [0, "),
    (["--steps", "1000000000"], "steps (for a sequence of 32 tokens) must be an integer in [1, 4096]"),
    (["--sampler", "strided", "--steps", str(10**12)], "steps (for a sequence of 32 tokens)"),
    (["--speculative", "1000000"], "speculative (the draft length; the sequence has 32 tokens)"),
    (["--speculative", str(10**30)], "speculative"),
    (["--temperature", "-1"], "--temperature"),
    (["--draft", "wide"], "--draft"),
])
def test_bad_sampling_arguments(ws, capsys, argv, needle):
    out = ws["root"] / "never.jsonl"
    rc, _, err = run_cli(["sample", ws["eso"], *argv, "--out", out], capsys)
    assert_one_line(rc, err, "sample", needle)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("which, needle", [("nope", "does not exist"), ("empty", "no config.json"),
                                           ("broken", "tokenizer")])
def test_bad_model_paths(ws, capsys, command, which, needle):
    rc, _, err = run_cli([command, ws["root"] / which], capsys)
    assert_one_line(rc, err, command, needle)


# ------------------------------------------------------------------------------------------------------
# Devices


def test_unknown_device(ws, capsys):
    rc, _, err = run_cli(["sample", ws["eso"], "--device", "nope"], capsys)
    assert_one_line(rc, err, "sample", "unknown device 'nope'")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "mps"])
def test_missing_accelerator(ws, capsys, monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    rc, _, err = run_cli(["eval", ws["eso"], "--device", name], capsys)
    assert_one_line(rc, err, "eval", f"device '{name}' is not available")
    with pytest.raises(UserError):
        resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")


def test_accelerator_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UserError, match="1 cuda device"):
        resolve_device("cuda:3")


# ------------------------------------------------------------------------------------------------------
# Benchmarks


@pytest.mark.parametrize("argv, needle", [
    (["--threads", "0"], "--threads"),
    (["--vocab", "1"], "--vocab"),
    (["--lengths", "16,x"], "--lengths"),
    (["--repeats", "0"], "--repeats"),
    (["--device", "nope"], "unknown device"),
])
def test_bad_bench_arguments(capsys, argv, needle):
    rc, _, err = run_cli(["bench", "latency", "--lengths", "16", "--hidden", "16", "--layers", "1", "--heads", "2",
                          *argv], capsys)
    assert_one_line(rc, err, "bench latency", needle)


# ------------------------------------------------------------------------------------------------------
# Importance-weighted bound: memory


def test_iw_k_huge_is_refused_only_when_one_row_cannot_fit(ws, capsys, monkeypatch):
    cfg = tiny_model(ESO, 300, 1).config
    row = 2 * LENGTH * 300 * 4
    assert perplexity.iw_row_bytes(cfg) == row
    assert row == 75 * 1024
    monkeypatch.setattr(perplexity, "available_memory", lambda device: row // 2)
    rc, _, err = run_cli(["eval", ws["eso"], "--iw-k", "65536", "--data", ws["data"], "--val-fraction", 0.5],
                         capsys)
    assert_one_line(rc, err, "eval", "needs 75.0 KiB per (order, sequence) row", "only 37.5 KiB is free")
    # a typo-sized K is refused before the model is even loaded (days of 2L passes, whatever the memory)
    rc, _, err = run_cli(["eval", "no/such/model.ckpt", "--iw-k", "100000000"], capsys)
    assert_one_line(rc, err, "eval", "above 65,536 orders")
    monkeypatch.setattr(perplexity, "available_memory", lambda device: row - 1)
    with pytest.raises(UserError, match="per \\(order, sequence\\) row"):
        perplexity.iw_chunk_rows(cfg, 16)
    # enough for one row but not a batch: the chunk shrinks instead of failing
    monkeypatch.setattr(perplexity, "available_memory", lambda device: 6 * row)
    assert perplexity.iw_chunk_rows(cfg, 16) == 3
    assert perplexity.iw_chunk_rows(cfg, 2) == 2
    assert perplexity.iw_chunk_rows(cfg, 16, chunk=6) == 6
    with pytest.raises(UserError, match="at most 6 rows"):
        perplexity.iw_chunk_rows(cfg, 16, chunk=7)
    monkeypatch.setattr(perplexity, "available_memory", lambda device: None)  # unknown: no limit
    assert perplexity.iw_chunk_rows(cfg, 16) == 16


def test_iw_orders_in_groups_equal_one_call(monkeypatch):
    """Bounded memory for any K: groups of orders combined in log space give the single-call bound (same
    chunks, same random orders), to float64 rounding."""
    from esolm.likelihood import iw_bound

    model = tiny_model(ESO, 40, 39).double()
    x0 = torch.randint(0, 39, (3, LENGTH), generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(x0, dtype=torch.bool)
    valid[2, 12:] = False
    whole = iw_bound(model, x0, 5, 0.5, torch.Generator().manual_seed(7), chunk_size=2, valid=valid, method=ESO)
    monkeypatch.setattr(perplexity, "IW_GROUP_ROWS", 4)  # groups of 2 orders: 2, 2, 1
    grouped = perplexity._iw_nll(model, x0, valid, 5, 0.5, torch.Generator().manual_seed(7), 2,
                                 perplexity.as_method(ESO))
    assert torch.allclose(grouped, whole, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------------
# Output paths: checked before the model is even loaded


def read_only_folder(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").touch()
    except OSError:
        return ro
    (ro / "probe").unlink()  # root ignores permission bits: use a folder nobody can create files in
    assert sys.platform.startswith("linux"), "need a read-only folder"
    return Path("/proc/self")


@pytest.mark.parametrize("kind", ["folder", "under_file", "read_only"])
@pytest.mark.parametrize("command, flag", [("sample", "--out"), ("sample", "--summary"), ("eval", "--json")])
def test_bad_output_paths_before_work(ws, tmp_path, capsys, kind, command, flag):
    if kind == "folder":
        target = ws["root"] / "empty"
    elif kind == "under_file":
        target = ws["root"] / "afile" / "x.json"
    else:
        target = read_only_folder(tmp_path) / "x.json"
    # a model path that does not exist: the output error comes first, so no model was loaded
    rc, _, err = run_cli([command, ws["root"] / "no-model", flag, target], capsys)
    assert_one_line(rc, err, command, str(target))
    assert "does not exist" not in err


def test_bench_output_path_before_work(ws, capsys):
    rc, _, err = run_cli(["bench", "latency", "--json", ws["root"] / "afile" / "lat.json"], capsys)
    assert_one_line(rc, err, "bench latency", "not a folder")


# ------------------------------------------------------------------------------------------------------
# Many samples: streamed, bounded memory, atomic


def test_a_billion_samples_stream_in_bounded_memory(ws, tmp_path, capsys, monkeypatch):
    """Rows reach the (temporary) file batch by batch, memory stays flat over batches, and an interrupted
    run leaves neither the output nor a temporary file."""
    out = tmp_path / "many.jsonl"
    stop, seen = 120, []

    def fake_generate(model, method, *, num_samples, params, max_length=None, **kw):
        tmp = list(tmp_path.glob(".many.jsonl.*"))
        assert len(tmp) == 1 and not out.exists()
        seen.append((num_samples, len(tmp[0].read_text().splitlines()), tracemalloc.get_traced_memory()[0]))
        if len(seen) > stop:
            raise KeyboardInterrupt
        g = torch.Generator().manual_seed(params.seed)
        return GenerationOutput(tokens=torch.randint(2, 300, (num_samples, LENGTH), generator=g), nfe=1,
                                seconds=1e-3)

    monkeypatch.setattr(samples, "generate", fake_generate)
    tracemalloc.start()
    try:
        rc, _, err = run_cli(["sample", ws["eso"], "--num-samples", 1_000_000_000, "--entropy", "--out", out], capsys)
    finally:
        tracemalloc.stop()
    assert rc == 130, err
    assert not out.exists() and not list(tmp_path.glob(".many.jsonl.*"))
    bs = samples.DEFAULT_BATCH_SIZE
    assert all(n == bs for n, _, _ in seen)
    assert [lines for _, lines, _ in seen] == [bs * k for k in range(len(seen))]  # flushed per batch
    grown = seen[-1][2] - seen[20][2]  # 100 batches = 6400 rows (~ 7 MB if they were kept)
    assert grown < 1_000_000, grown


def test_samples_stream_to_the_final_file(ws, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    rc, _, err = run_cli(["sample", ws["eso"], "--num-samples", 7, "--batch-size", 3, "--steps", 2, "--entropy",
                          "--summary", tmp_path / "sum.json", "--out", out], capsys)
    assert rc == 0, err
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(7)) and [r["batch"] for r in rows] == [0] * 3 + [1] * 3 + [2]
    summary = json.loads((tmp_path / "sum.json").read_text())
    assert summary["num_samples"] == 7 and summary["nfe"] == sum({r["batch"]: r["nfe"] for r in rows}.values())
    assert math.isfinite(summary["entropy"])
    assert not list(tmp_path.glob(".*.tmp*"))


# ------------------------------------------------------------------------------------------------------
# generate(): the Python API checks what the command line checks


class CountingModel(torch.nn.Module):
    """Wraps a model and counts network calls: a refused request must make none."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.calls = 0

    @property
    def config(self):
        return self.inner.config

    @property
    def device(self):
        return self.inner.device

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


VOCAB, MASK = 40, 39


@pytest.fixture(scope="module")
def api_model():
    return tiny_model(ESO, VOCAB, MASK)


BAD_REQUESTS = {
    "num_samples_zero": dict(num_samples=0),
    "num_samples_float": dict(num_samples=2.5),
    "num_samples_bool": dict(num_samples=True),
    "batch_size_zero": dict(batch_size=0),
    "steps_zero": dict(steps=0),
    "steps_bool": dict(steps=True),
    "steps_float": dict(steps=2.0),
    "max_length_zero": dict(max_length=0),
    "max_length_too_long": dict(max_length=LENGTH + 1),
    "prompt_out_of_vocab": dict(prompt_ids=[3, VOCAB]),
    "prompt_negative": dict(prompt_ids=[3, -1]),
    "prompt_mask_id": dict(prompt_ids=[3, MASK]),
    "prompt_floats": dict(prompt_ids=[3.0, 4.0]),
    "infill_out_of_range": dict(infill={LENGTH: 3}),
    "infill_negative_position": dict(infill={-1: 3}),
    "infill_duplicate_position": dict(infill={torch.tensor(4): 3, torch.tensor(4): 5}),
    "infill_inside_prompt": dict(prompt_ids=[1, 2, 3], infill={1: 7}),
    "infill_mask_id": dict(infill={4: MASK}),
    "infill_row_bad_entry": dict(infill=[[-2] + [-1] * (LENGTH - 1)]),
    "eos_out_of_vocab": dict(eos_id=VOCAB),
    "eos_is_mask": dict(eos_id=MASK),
    "top_p_nan": dict(top_p=float("nan")),
    "top_p_inf": dict(top_p=float("inf")),
    "top_p_zero": dict(top_p=0.0),
    "top_p_above_one": dict(top_p=1.5),
    "alpha0_above_one": dict(alpha0=1.5),
    "sampler_unknown": dict(sampler="nope"),
    "sampler_not_a_string": dict(sampler=None),
    "seed_float": dict(seed=0.5),
    "seed_negative": dict(seed=-1),
    "seed_2_to_63": dict(seed=2**63),  # s and s + 2**63 would seed torch alike: refused, not aliased
    "steps_a_billion": dict(steps=10**9),
    "strided_steps_huge": dict(sampler="strided", steps=10**12),
    "speculative_huge": dict(speculative=10**6),
    "speculative_overflow": dict(speculative=10**30),
    "temperature_negative": dict(temperature=-0.5),
    "temperature_nan": dict(temperature=float("nan")),
    "greedy_not_bool": dict(greedy="yes"),
}


def test_a_good_request_samples(api_model):
    model = CountingModel(api_model)
    out = generate(model, ESO, num_samples=2, steps=2, prompt_ids=[1, 2], infill={5: 7}, eos_id=0, top_p=0.9)
    assert model.calls >= 1 and out.tokens.shape == (2, LENGTH)
    assert out.tokens[:, :2].tolist() == [[1, 2]] * 2 and out.tokens[:, 5].tolist() == [7, 7]


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_generate_refuses_bad_requests_before_sampling(api_model, case):
    kwargs = {"num_samples": 2, "steps": 2, **BAD_REQUESTS[case]}
    model = CountingModel(api_model)
    with pytest.raises(EsoLMError) as e:
        generate(model, ESO, **kwargs)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    with pytest.raises(type(e.value)):
        check_request(model, ESO, **kwargs)
    assert model.calls == 0
