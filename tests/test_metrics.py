"""Metrics: unigram entropy, judge perplexity (tiny in-test judge vs brute force), MAUVE call path."""

import math

import numpy as np
import pytest
import torch

from esolm.errors import UserError
from esolm.evaluation import metrics

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the a cat dog sat on mat ran far and big small red blue green tree house by".split()


def tiny_tokenizer(bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", **kw), vocab


def tiny_judge(bos: bool, context: int, batch_size: int = 4, dtype: torch.dtype = torch.float64):
    """A random GPT-2 judge; float64 by default, where the identities below hold to 1e-12."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok, vocab = tiny_tokenizer(bos)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).to(dtype)
    return metrics.Judge(model, tok, context=context, batch_size=batch_size), vocab


TEXTS = [
    "the cat sat on the mat",
    "a big red dog ran far and the small blue cat sat on a green tree by the house",
    "tree",
    "dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog",
]


def brute_force_nll(judge, vocab, text, bos):
    """Score each target from its own window with one forward pass per token (no batching, no padding)."""
    ids = ([vocab["<s>"]] if bos else []) + [vocab[w] for w in text.split()]
    c = judge.context
    total, n = 0.0, 0
    for j in range(1, len(ids)):
        start = ((j - 1) // (c - 1)) * (c - 1)  # window k covers [k(c-1), k(c-1)+c) and scores its tokens 1..
        ctx = torch.tensor([ids[start:j]])
        with torch.no_grad():
            logp = torch.log_softmax(judge.model(ctx).logits[0, -1].double(), -1)
        total -= float(logp[ids[j]])
        n += 1
    return total, n


def test_entropy_hand_values():
    assert metrics.sample_entropies([[1, 1, 1, 1]]) == [0.0]
    assert metrics.sample_entropies([[1, 2, 3, 4]])[0] == pytest.approx(math.log(4), rel=1e-12)  # float64
    # counts 2,1,1 -> p = .5,.25,.25
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert metrics.sample_entropies(torch.tensor([[5, 5, 7, 9]]))[0] == pytest.approx(h, rel=1e-12)
    # average over samples, ignored ids removed before counting
    assert metrics.unigram_entropy([[1, 2], [3, 3]]) == pytest.approx(math.log(2) / 2, rel=1e-12)
    assert metrics.unigram_entropy([[1, 2, 0, 0]], ignore_ids=[0]) == pytest.approx(math.log(2), rel=1e-12)
    with pytest.raises(ValueError):
        metrics.unigram_entropy([])


# float64 proves the identity (batched, padded windows == one unpadded pass per token) to 1e-12. float32 is
# what judges run in: the summed NLL of a text (a sum of non-negative per-token NLLs) agrees to 1e-5 of its
# size (~84 float32 eps; observed ~1e-7 of it), and so does the perplexity.
@pytest.mark.parametrize("dtype,rtol", [pytest.param(torch.float64, 1e-12, id="float64"),
                                        pytest.param(torch.float32, 1e-5, id="float32")])
@pytest.mark.parametrize("bos", [True, False])
def test_judge_perplexity_matches_brute_force(bos, dtype, rtol):
    judge, vocab = tiny_judge(bos, context=16, dtype=dtype)
    score = judge.score(TEXTS)
    nll, n = zip(*(brute_force_nll(judge, vocab, t, bos) for t in TEXTS))
    assert score.tokens_per_sample == list(n)
    # with a BOS every word is scored; without one the first word of each text has no prediction
    assert score.tokens == sum(len(t.split()) - (0 if bos else 1) for t in TEXTS)
    np.testing.assert_allclose(score.nll_per_sample, nll, rtol=rtol, atol=0)
    assert score.perplexity == pytest.approx(math.exp(sum(nll) / sum(n)), rel=rtol)


def test_judge_windows_and_batches_aggregate_exactly():
    judge, vocab = tiny_judge(bos=True, context=5, batch_size=1)
    assert judge.windows(list(range(9))) == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    assert judge.windows(list(range(10))) == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert judge.windows([3]) == []
    score = judge.score(TEXTS)
    nll, n = zip(*(brute_force_nll(judge, vocab, t, True) for t in TEXTS))
    np.testing.assert_allclose(score.nll_per_sample, nll, rtol=1e-12, atol=0)  # float64 judge
    # any batch size gives the same exact aggregate; so does scoring subsets and merging
    judge.batch_size = 3
    again = judge.score(TEXTS)
    np.testing.assert_allclose(again.nll_per_sample, score.nll_per_sample, rtol=1e-12, atol=0)
    merged = judge.score(TEXTS[:2]).merge(judge.score(TEXTS[2:]))
    assert merged.tokens == score.tokens
    assert merged.perplexity == pytest.approx(score.perplexity, rel=1e-12)
    # the exact aggregate is not the mean of per-sample perplexities
    per_sample = np.mean([math.exp(a / b) for a, b in zip(nll, n)])
    assert abs(per_sample - score.perplexity) > 1e-3


def test_judge_rejects_bad_context():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok, vocab = tiny_tokenizer(True)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=8, n_embd=8, n_layer=1, n_head=1))
    with pytest.raises(ValueError):
        metrics.Judge(model, tok, context=9)
    assert metrics.Judge(model, tok).context == 8


def test_mauve_identical_close_to_one_different_low():
    pytest.importorskip("mauve")
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(80, 8)), rng.normal(size=(80, 8))
    far = rng.normal(size=(80, 8)) + 3.0
    kw = dict(num_buckets=4, kmeans_num_redo=1, kmeans_max_iter=50)
    same = metrics.mauve_score(p, q, **kw)
    diff = metrics.mauve_score(p, far, **kw)
    assert same > 0.9
    assert diff < 0.1
    with pytest.raises(ValueError):
        metrics.mauve_score(p, q[:, :4])


def test_featurizer_mean_pools_real_tokens_only(tmp_path):
    """Features are unit vectors and do not depend on the padding added by batching."""
    from transformers import BertConfig, BertModel

    tok, vocab = tiny_tokenizer(bos=False)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertModel(cfg)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    feat = metrics.Featurizer.load(tmp_path, batch_size=2)
    texts = ["the cat", "a big red dog ran far and the small blue cat sat", "tree house"]
    batched = feat(texts)
    alone = np.concatenate([feat([t]) for t in texts])
    assert batched.shape == (3, 16)
    # features are float32 unit vectors (every entry <= 1 in size), so 1e-5 is ~84 float32 eps of the scale
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    # hand mean pooling of the first text
    ids = torch.tensor([[vocab["the"], vocab["cat"]]])
    with torch.no_grad():
        h = model(input_ids=ids).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(batched[0], (h / h.norm()).numpy(), rtol=0, atol=1e-5)
    with pytest.raises(UserError):
        metrics.Featurizer.load(tmp_path / "missing")


def test_judge_bos_token_choice():
    judge, vocab = tiny_judge(bos=False, context=16)
    explicit = metrics.Judge(judge.model, judge.tokenizer, context=16, bos_token="<s>")
    assert explicit.bos_id == vocab["<s>"]
    assert explicit.score(TEXTS).tokens == judge.score(TEXTS).tokens + len(TEXTS)
    auto_with_bos, _ = tiny_judge(bos=True, context=16)
    assert metrics.Judge(auto_with_bos.model, auto_with_bos.tokenizer, bos_token=None).bos_id is None
    with pytest.raises(ValueError):
        metrics.Judge(judge.model, judge.tokenizer, bos_token="<nope>")


# -- a judge trained with esolm (the character-level frontier) -------------------------------------------------

def _esolm_model_folder(tmp_path, method: dict, adaln: bool, length: int = 12):
    from esolm.config import ModelConfig
    from esolm.data.tokenizers import get_tokenizer
    from esolm.io import save_pretrained
    from esolm.model.backbone import DiT

    tok = get_tokenizer("chars")
    cfg = ModelConfig(vocab_size=tok.vocab_size, mask_id=tok.mask_id, hidden_size=32, cond_dim=16, n_layers=2,
                      n_heads=4, length=length, adaln=adaln)
    model = DiT(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    folder = tmp_path / method["name"]
    save_pretrained(model, folder, method, tokenizer=tok)
    return folder, model.double().eval(), tok


@pytest.mark.numerics
def test_esolm_ar_judge_is_the_models_own_likelihood(tmp_path):
    """Judge NLL of a text = the AR objective's NLL of [BOS] + text (one window), and the window sum for texts
    longer than the model (windows overlap by one token, each token after the first scored once)."""
    from esolm.objectives import ARObjective

    folder, model, tok = _esolm_model_folder(tmp_path, {"name": "ar"}, adaln=False)
    assert metrics.is_esolm_model(folder) and not metrics.is_esolm_model(tmp_path / "nothing")
    judge = metrics.Judge.load(str(folder), dtype=torch.float64, batch_size=3)
    assert isinstance(judge, metrics.EsoLMJudge) and judge.context == 12
    short = ["the cat", "a", "Eso-LM!", "x y z 123"]
    long = ["the quick brown fox jumps over the lazy dog", "abcdefghijklmnopqrstuvwxyz0123"]
    score = judge.score(short + long)
    ar = ARObjective({"name": "ar"}).eval()
    for i, text in enumerate(short):
        ids = torch.tensor([[tok.bos_id] + tok.encode(text)])
        out = ar(model, ids)
        assert score.tokens_per_sample[i] == len(text)
        assert math.isclose(score.nll_per_sample[i], float(out.terms["ar"][0].detach()), rel_tol=1e-12)
    for j, text in enumerate(long):
        ids = [tok.bos_id] + tok.encode(text)
        want = 0.0
        for s in range(0, len(ids) - 1, 11):
            w = torch.tensor([ids[s:s + 12]])
            want += float(ar(model, w).terms["ar"][0].detach())
        assert score.tokens_per_sample[len(short) + j] == len(text)
        assert math.isclose(score.nll_per_sample[len(short) + j], want, rel_tol=1e-12)


def test_esolm_judge_must_be_ar(tmp_path):
    folder, _, _ = _esolm_model_folder(tmp_path, {"name": "mdlm"}, adaln=True)
    with pytest.raises(UserError, match="must be an AR model"):
        metrics.Judge.load(str(folder))
    with pytest.raises(UserError, match="exceeds"):
        metrics.Judge.load(str(_esolm_model_folder(tmp_path, {"name": "ar"}, adaln=False)[0]), context=13)
    hf_like = tmp_path / "hf"
    hf_like.mkdir()
    (hf_like / "config.json").write_text('{"model_type": "gpt2"}')
    assert not metrics.is_esolm_model(hf_like)
