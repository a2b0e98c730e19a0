"""EsoLlama as a first-class esolm model: ``save_pretrained`` / ``load_model`` of an esolm Llama folder,
``adapt_base`` (an esolm folder from a Hugging Face Llama folder, no fine-tuning), and the commands that take a model
path (``esolm sample``, ``esolm eval``, lm-eval's ``esolm`` model) on it.

What is proven, on tiny random Llama networks (tests/test_llama.py's config: 2 layers, hidden 32, 4 heads sharing 2
key/value heads) with tests/test_llama_tokenizer.py's tiny BPE (300 ids + the mask): the round trip is exact; with
the AR method the adapted folder *is* the base model (greedy decoding and lm-eval log-likelihoods equal
transformers', float64); with Eso-LM (B) at alpha0 = 0 decoding is left to right but queries a mask token at each
decoded position, so the untrained adapted model is *not* the base model — docs/llama.md says so, and so does the
folder's ``provenance``.
"""

import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers", reason="the Hugging Face reference (and the base folders) need transformers")
from transformers import LlamaForCausalLM  # noqa: E402

from esolm.cli import main  # noqa: E402
from esolm.config import ModelConfig  # noqa: E402
from esolm.data.tokenizers import hf_folder_tokenizer  # noqa: E402
from esolm.errors import CheckpointError, ConfigError, UserError  # noqa: E402
from esolm.io import llama as llama_io  # noqa: E402
from esolm.io import load_model, load_pretrained, pretrained, save_pretrained, weights  # noqa: E402
from esolm.io.pretrained import ADAPT_METHOD, NOT_ADAPTED_NOTE, adapt_base  # noqa: E402
from esolm.methods import as_method  # noqa: E402
from esolm.model import DiT, EsoLlama, masks  # noqa: E402
from esolm.sampling import generate  # noqa: E402
from esolm.sampling.decoders import decoder_for  # noqa: E402
from esolm.sampling.params import SamplingParams  # noqa: E402
from test_llama import hf_config, hf_in_float64  # noqa: E402
from test_llama_tokenizer import SMOL_CONFIG, VOCAB, tiny_backend, write_tokenizer  # noqa: E402

L = 32
ESO_B = {"name": "esolm", "variant": "B", "alpha0": 0.5}
AR = {"name": "ar"}


def make_base(folder, tied: bool = True):
    """A Hugging Face Llama folder: random ``LlamaForCausalLM`` weights, the tiny BPE and SmolLM2's specials."""
    torch.manual_seed(7)
    LlamaForCausalLM(hf_config(tied, vocab_size=VOCAB, max_position_embeddings=L)).save_pretrained(folder)
    return write_tokenizer(folder, tiny_backend(), tokenizer_config=SMOL_CONFIG)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def adapted(base, tmp_path_factory):
    """esolm folders adapted from ``base``: the default method (Eso-LM (B), alpha0 = 0) and AR, float64 and float32."""
    root = tmp_path_factory.mktemp("adapted")
    return {"eso64": adapt_base(base, root / "eso64", dtype=torch.float64),
            "ar64": adapt_base(base, root / "ar64", AR, dtype=torch.float64),
            "eso": adapt_base(base, root / "eso"),
            "ar": adapt_base(base, root / "ar", AR)}


def hf_model(base):
    return LlamaForCausalLM.from_pretrained(base, dtype=torch.float64, attn_implementation="sdpa").eval()


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_load_round_trip_is_exact(tmp_path, tied):
    base = make_base(tmp_path / "base", tied)
    model = llama_io.from_hf_folder(base, dtype=torch.float64)
    tok = hf_folder_tokenizer(base, base_vocab_size=model.config.base_vocab_size)
    out = save_pretrained(model, tmp_path / "out", ESO_B, tokenizer=tok)
    meta = json.loads((out / "config.json").read_text())
    assert meta["backbone"] == "llama" and meta["format"] == "esolm" and meta["version"] == 1
    assert meta["model"] == model.config.to_dict() and meta["method"] == as_method(ESO_B).to_dict()
    assert "provenance" not in meta
    loaded = load_model(out)
    got = loaded.model
    assert isinstance(got, EsoLlama) and got.dtype == torch.float64 and not got.training
    assert got.config == model.config and same_state(got, model)
    assert loaded.method == as_method(ESO_B) and loaded.tokenizer.meta() == tok.meta() and loaded.provenance == {}
    g = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(2)])
    x = torch.randint(0, VOCAB, (2, L), generator=g)
    x[:, 20:] = model.config.mask_id
    with torch.no_grad():
        ref = model(x.gather(1, order), order, mask=masks.causal(L))
        assert torch.equal(got(x.gather(1, order), order, mask=masks.causal(L)), ref)
    model2, method2 = load_pretrained(out)
    assert same_state(model2, model) and method2 == as_method(ESO_B)


def test_adapt_base_writes_a_folder_load_model_reads(adapted, base):
    loaded = load_model(adapted["eso"])
    model, method, tok = loaded.model, loaded.method, loaded.tokenizer
    assert isinstance(model, EsoLlama) and model.dtype == torch.float32  # the source's dtype
    assert method == as_method({"name": "esolm", "variant": "B", "alpha0": 0.0})
    assert tok.mask_id == model.config.mask_id == VOCAB and tok.vocab_size == model.config.vocab_size
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # <|im_start|>, <|im_end|> from tokenizer_config.json
    assert same_state(model, llama_io.from_hf_folder(base))
    assert loaded.provenance == {"base": base.name, "adapted": False, "note": NOT_ADAPTED_NOTE}
    meta = json.loads((adapted["eso"] / "config.json").read_text())
    assert meta["provenance"] == loaded.provenance and meta["backbone"] == "llama"
    again = loaded.save_pretrained(adapted["eso"].parent / "again")  # the provenance travels with the model
    assert load_model(again).provenance == loaded.provenance
    assert load_model(adapted["ar"]).method == as_method(AR)


def test_adapt_base_refuses_bad_requests_before_reading_weights(base, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_io, "from_hf_folder", lambda *a, **k: pytest.fail("weights read"))
    cases = [
        (dict(method={"name": "mdlm"}), ConfigError, "adapt it as Eso-LM \\(B\\) or AR, not MDLM"),
        (dict(method={"name": "esolm", "variant": "A"}), ConfigError, "not Eso-LM \\(A\\)"),
        (dict(method={"name": "gpt"}), ConfigError, "method name must be one of"),
        (dict(out=base), UserError, "holds the source model"),
        (dict(source=tmp_path / "absent"), UserError, "does not exist"),
        (dict(dtype=torch.int64), UserError, "dtype must be one of"),
        (dict(length=L + 1), UserError, "exceeds the model's max_position_embeddings"),
    ]
    (tmp_path / "file").write_text("x")
    cases.append((dict(out=tmp_path / "file"), UserError, "exists and is not a folder"))
    notok = tmp_path / "notok"
    notok.mkdir()
    shutil.copy(base / "config.json", notok / "config.json")
    cases.append((dict(source=notok), CheckpointError, "no tokenizer.json"))
    for kw, err, msg in cases:
        args = dict(source=base, out=tmp_path / "out", method=ADAPT_METHOD)
        args.update(kw)
        extra = {k: v for k, v in args.items() if k in ("dtype", "length")}
        with pytest.raises(err, match=msg) as e:
            adapt_base(args["source"], args["out"], args["method"], **extra)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_load_model_config_override_and_foreign_inputs(adapted, base, tmp_path):
    cfg = load_model(adapted["eso"]).model.config
    assert load_model(adapted["eso"], config=dataclasses.replace(cfg, length=16)).model.config.length == 16
    assert load_model(adapted["eso"], config={**cfg.to_dict(), "length": 8}).model.config.length == 8
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    cases = [
        (lambda: load_model(adapted["eso"], config=ModelConfig(vocab_size=8, mask_id=7, hidden_size=8, n_layers=1,
                                                               n_heads=2, length=8)),
         "config= for a Llama folder must be an EsoLlamaConfig"),
        (lambda: load_model(adapted["eso"], config={**cfg.to_dict(), "n_kv_heads": 3}),
         "config=: invalid Llama model config \\(n_kv_heads"),
        (lambda: load_model(base), "a Hugging Face Llama folder, not an esolm one: .*adapt_base"),
        (lambda: load_model(gguf), "a GGUF file, not an esolm checkpoint: .*adapt_base"),
    ]
    for call, msg in cases:
        with pytest.raises(CheckpointError, match=msg) as e:
            call()
        assert "\n" not in str(e.value)


def _damaged(src, dst, meta=None, state=None):
    shutil.copytree(src, dst)
    if meta is not None:
        m = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(meta(m)))
    if state is not None:
        save_file(state(load_file(str(dst / "model.safetensors"))), str(dst / "model.safetensors"))
    return dst


def _model(**kw):
    return lambda m: {**m, "model": {**m["model"], **kw}}


BAD_FOLDERS = {
    "backbone": (lambda m: {**m, "backbone": "mamba"}, None, "backbone 'mamba' is not one this esolm reads"),
    "lacks": (lambda m: {**m, "model": {k: v for k, v in m["model"].items() if k != "head_dim"}}, None,
              "invalid Llama model config \\(the Llama config lacks head_dim\\)"),
    "unknown": (_model(mask_id=3), None, "unknown Llama config keys: mask_id"),
    "kv_heads": (_model(n_kv_heads=3), None, "must divide n_heads"),
    "not_dict": (lambda m: {**m, "model": [1]}, None, "a Llama config must be a dict"),
    "provenance": (lambda m: {**m, "provenance": "adapted"}, None, "provenance must be a JSON object"),
    "untied": (_model(tie_word_embeddings=False), None, "missing keys lm_head.weight"),
    "vocab": (_model(base_vocab_size=VOCAB + 1), None,
              "'embed_tokens.weight' has shape \\[301, 32\\] in the checkpoint but \\[302, 32\\]"),
    "missing": (None, lambda s: {k: v for k, v in s.items() if k != "layers.1.mlp.up_proj.weight"},
                "missing keys layers.1.mlp.up_proj.weight"),
    "int": (None, lambda s: {**s, "norm.weight": s["norm.weight"].long()}, "has dtype I64"),
    "nan": (None, lambda s: {**s, "norm.weight": s["norm.weight"].clone().fill_(float("nan"))},
            "holds NaN or infinite values"),
    "huge": (_model(n_layers=10**7), None, "the model has .* parameters \\(10000000 layers.* GiB of memory is"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_llama_folders_are_one_line_errors_before_building(adapted, tmp_path, monkeypatch, case):
    meta, state, msg = BAD_FOLDERS[case]
    folder = _damaged(adapted["eso"], tmp_path / case, meta, state)
    monkeypatch.setattr(EsoLlama, "assemble", classmethod(lambda *a, **k: pytest.fail("model built")))
    with pytest.raises(CheckpointError, match=msg) as e:
        load_model(folder)
    assert "\n" not in str(e.value)


def test_llama_folder_memory_is_checked_before_any_tensor_is_read(adapted, monkeypatch):
    monkeypatch.setattr(weights, "available_memory", lambda: 1000)
    monkeypatch.setattr(pretrained, "read_safetensors", lambda *a: pytest.fail("tensors read"))
    with pytest.raises(CheckpointError, match="building it needs .* but only 0.0 GiB"):
        load_model(adapted["eso"])


def test_truncated_llama_weights_are_one_line(adapted, tmp_path):
    folder = _damaged(adapted["eso"], tmp_path / "t")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="outside the file's") as e:
        load_model(folder)
    assert "\n" not in str(e.value)


def test_save_pretrained_refuses_bad_provenance(adapted, tmp_path):
    model = load_model(adapted["eso"]).model
    for bad, msg in (("x", "provenance must be a dict"), ({"a": float("nan")}, "JSON values only"),
                     ({"a": object()}, "JSON values only")):
        with pytest.raises(UserError, match=msg):
            save_pretrained(model, tmp_path / "p", provenance=bad)
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------------------------------
# (i) decoding: AR == the base model; Eso-LM (B) at alpha0 = 0 is left to right but is not the base model
# --------------------------------------------------------------------------------------------------


def test_ar_greedy_generate_equals_transformers(adapted, base):
    loaded = load_model(adapted["ar64"])
    tok = loaded.tokenizer
    prompt = tok.encode_prompt("The river runs")
    with hf_in_float64():
        ref = hf_model(base).generate(torch.tensor([prompt]), max_new_tokens=L - len(prompt), do_sample=False,
                                      pad_token_id=tok.pad_id)
    out = generate(loaded.model, loaded.method, prompt_ids=[prompt], greedy=True)
    assert ref.shape == (1, L) and torch.equal(out.tokens, ref)
    assert len(set(ref[0, len(prompt):].tolist())) > 3  # not a degenerate repetition
    text = loaded.generate("The river runs", temperature=0, stop_at_eos=False)
    assert text == [tok.decode(ref[0, len(prompt):].tolist())]


@pytest.mark.parametrize("sampler", ["auto", "first_hitting"])
def test_esolm_b_at_alpha0_0_is_the_base_model(adapted, base, sampler):
    """alpha0 = 0: the plan is the left-to-right order, every step sequential (one position per call), and under the
    shifted query convention each step's query is the previous token at the previous position: the adapted (not
    fine-tuned) model *is* the base model: every step's logits equal the base model's next-token logits (1e-10,
    float64) and greedy decoding equals transformers' token for token."""
    loaded = load_model(adapted["eso64"])
    model, method, tok = loaded.model, loaded.method, loaded.tokenizer
    prompt = tok.encode_prompt("The river runs")
    p = len(prompt)
    params = SamplingParams(temperature=0, sampler=sampler).resolve(method, L)
    free = (torch.arange(L) >= p)[None]
    plan = decoder_for(method).plan(free, p, params, torch.Generator().manual_seed(0))
    assert plan.n_diffusion == 0 and plan.counts == [1] * (L - p) and torch.equal(plan.order[0], torch.arange(L))
    seen = []
    out = generate(model, method, prompt_ids=[prompt], params=params,
                   step_callback=lambda k, lo, hi, logits, state: seen.append(logits[0, 0, :VOCAB].clone()))
    assert len(seen) == L - p and not (out.tokens == model.config.mask_id).any()
    hf = hf_model(base)
    with torch.no_grad(), hf_in_float64():
        ref = hf(out.tokens).logits[0, p - 1:L - 1]  # the base model's prediction of positions p..L-1
        greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=L - p, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(torch.stack(seen), ref, rtol=0, atol=1e-10)
    assert torch.equal(out.tokens, greedy)


# --------------------------------------------------------------------------------------------------
# (ii) the commands: esolm sample / eval
# --------------------------------------------------------------------------------------------------


def _run(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["eso", "ar"])
def test_cli_sample_and_eval_run_on_an_adapted_folder(adapted, tmp_path, capsys, kind):
    folder = adapted[kind]
    rc, err = _run(["sample", folder, "--num-samples", 2, "--max-length", 16, "--prompt", "The river",
                    "--out", tmp_path / "s.jsonl", "--seed", 1, "--entropy"], capsys)
    assert rc == 0, err
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["token_ids"]) == 16 and r["token_ids"][0] == 1 for r in rows)
    iw = ["--iw-k", 1] if kind == "eso" else []
    rc, err = _run(["eval", folder, "--max-batches", 1, "--batch-size", 2, "--max-documents", 200, *iw,
                    "--json", tmp_path / "e.json"], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "e.json").read_text())["results"][0]
    assert res["tokens"] > 0 and 0 < res["nelbo"] < 100


def test_cli_bad_input_on_llama_folders_is_one_line(adapted, base, tmp_path, capsys):
    broken = _damaged(adapted["eso"], tmp_path / "broken", lambda m: {**m, "backbone": "mamba"})
    cases = [
        (["sample", adapted["eso"], "--max-length", L + 1], "--max-length 33 exceeds the model's length 32"),
        (["sample", adapted["ar"], "--prompt", "x" * 200], "nothing left to generate"),
        (["sample", adapted["eso"], "--speculative", L + 1], "speculative"),
        (["eval", adapted["eso"], "--length", L + 1], "exceeds the model's length"),
        (["eval", adapted["ar"], "--iw-k", 1], "needs a causal Eso-LM \\(B\\) model"),
        (["eval", broken], "backbone 'mamba' is not one this esolm reads"),
        (["sample", base, "--out", tmp_path / "x.jsonl"], "a Hugging Face Llama folder, not an esolm one"),
    ]
    for argv, msg in cases:
        rc, err = _run(argv, capsys)
        assert rc == 2, (argv, err)
        line = err.strip()
        assert "\n" not in line and "Traceback" not in line
        assert re.search(msg, line), (msg, line)
    assert not (tmp_path / "x.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# (iii) lm-eval: the AR folder's log-likelihoods are transformers'
# --------------------------------------------------------------------------------------------------


def test_lm_eval_loglikelihood_with_the_ar_method_equals_transformers(adapted, base):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from esolm.integrations.lm_eval import EsoLMLM

    lm = EsoLMLM(pretrained=str(adapted["ar64"]))
    pairs = [("The river runs", " through the city"), ("A small model", " reads the text."),
             ("", "The council met"), ("Diffusion <|im_end|> models", " fill in")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("The river runs past the mill.",), 0)])
    hf = hf_model(base)

    def hf_score(ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        ids = torch.tensor([ctx + cont])
        with torch.no_grad(), hf_in_float64():
            logp = torch.log_softmax(hf(ids).logits[0, len(ctx) - 1:-1], -1)
        tgt = torch.tensor(cont)
        return logp.gather(1, tgt[:, None]).sum().item(), bool((logp.argmax(-1) == tgt).all())

    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        c_ids, x_ids = lm._encode_pair(ctx, cont) if ctx else ([lm.prefix_token_id], lm.tok_encode(cont))
        ref, ref_greedy = hf_score(c_ids, x_ids)
        assert ll == pytest.approx(ref, rel=0, abs=1e-9) and greedy == ref_greedy
    text_ids = lm.tok_encode("The river runs past the mill.")
    assert rolling[0] == pytest.approx(hf_score([lm.prefix_token_id], text_ids)[0], rel=0, abs=1e-9)


# --------------------------------------------------------------------------------------------------
# The accessors the serving engine sizes its cache with, on both backbones
# --------------------------------------------------------------------------------------------------


def _kv_entry(model, n: int = 3):
    cache = model.new_cache(n)
    with torch.no_grad():
        model(torch.zeros(1, n, dtype=torch.long), mask=masks.causal(n), cache=cache, commit=n)
    return cache


def test_backbones_expose_dtype_and_kv_layout(adapted):
    llama = load_model(adapted["eso64"]).model
    dit = DiT(ModelConfig(vocab_size=11, mask_id=10, hidden_size=32, cond_dim=8, n_layers=3, n_heads=4,
                          length=8)).to(torch.float64)
    assert llama.kv_layout() == (2, 2, 8) and dit.kv_layout() == (3, 4, 8)
    for model in (llama, dit):
        n_layers, kv_heads, head_dim = model.kv_layout()
        cache = _kv_entry(model)
        assert len(cache.k) == n_layers and model.dtype == torch.float64
        for k in cache.k + cache.v:
            assert k.shape == (1, kv_heads, 3, head_dim) and k.dtype == model.dtype
    assert load_model(adapted["eso"]).model.dtype == torch.float32
