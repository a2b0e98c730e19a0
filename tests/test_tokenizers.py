"""Tokenizers: known ids, special tokens, round trips, save/load, the shipped BPE."""

import pytest

from esolm.data.tokenizers import BPE8K_FILE, Tokenizer, bert_base_uncased, bpe8k, get_tokenizer, gpt2, train_bpe

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Eso-LMs fuse autoregressive and masked-diffusion models; caching is exact (max diff 0.0).",
    "  leading spaces, tabs\tand\nnewlines\n\n survive   byte-level BPE",
    "Ünïcödé, emoji 🙂, CJK 漢字, and math ∑_i x_i ≤ 1",
]


@pytest.fixture(scope="module")
def tok_gpt2():
    return gpt2()


def test_gpt2_known_ids_and_specials(tok_gpt2):
    # Values of the original GPT-2 tokenizer (tiktoken / HF "gpt2").
    assert tok_gpt2.encode("Hello world") == [15496, 995]
    assert tok_gpt2.encode(" the") == [262]
    assert tok_gpt2.eos_id == tok_gpt2.bos_id == 50256
    assert tok_gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert tok_gpt2.mask_id == 50257 and tok_gpt2.vocab_size == 50258
    assert tok_gpt2.decode([15496, 50257, 995]) == "Hello world"  # mask is a special token: skipped
    assert "<|mask|>" in tok_gpt2.decode([50257], skip_special_tokens=False)


@pytest.mark.parametrize("factory", [gpt2, bpe8k])
def test_byte_level_round_trip_is_exact(factory):
    tok = factory()
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    assert tok.decode_batch(tok.encode_batch(TEXTS)) == TEXTS


def test_bert_uncased_round_trip_and_specials():
    tok = bert_base_uncased()
    assert tok.vocab_size == 30522
    assert (tok.mask_id, tok.bos_id, tok.eos_id, tok.pad_id) == (103, 101, 102, 0)
    assert tok.encode("Hello World") == [7592, 2088]  # bert-base-uncased ids
    for t in TEXTS[:3]:
        # WordPiece lower-cases and re-spaces punctuation: compare normalised text
        assert tok.decode(tok.encode(t)).replace(" ", "") == t.lower().replace(" ", "")


def test_shipped_bpe8k():
    tok = bpe8k()
    assert BPE8K_FILE.is_file()
    assert tok.vocab_size == 8192 and tok.eos_id == 0 and tok.mask_id == 1
    # trained on English Wikipedia: common words are single tokens
    assert len(tok.encode(" the")) == 1 and len(tok.encode(" history")) == 1
    assert tok.encode("") == []


@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased", "esolm-bpe-8k"])
def test_save_load_round_trip(name, tmp_path):
    tok = get_tokenizer(name)
    tok.save(tmp_path / "m")
    back = get_tokenizer(tmp_path / "m")
    assert isinstance(back, Tokenizer)
    assert back.meta() == tok.meta() and back.fingerprint == tok.fingerprint
    for t in TEXTS:
        assert back.encode(t) == tok.encode(t)


def test_train_bpe_small_and_unknown_name():
    tok = train_bpe(["abc abd abe " * 50, "xyz xy x"] * 5, vocab_size=300, name="t")
    assert tok.mask_id == 1 and tok.eos_id == 0 and tok.vocab_size <= 300
    assert tok.decode(tok.encode("abd xyz")) == "abd xyz"
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("no-such-tokenizer")


def test_chars_normalises_text8_style():
    """Accents stripped, Unicode dashes to '-', any whitespace to a space, other non-ASCII dropped; printable
    ASCII untouched (the character-level corpus is encodable whole)."""
    from esolm.data.tokenizers import get_tokenizer

    tok = get_tokenizer("chars")
    cases = {"café Ōsaka": "cafe Osaka", "1990–1995 — x − y": "1990-1995 - x - y", "a\nb\tc\xa0d": "a b c d",
             "α°×β!": "!", "naïve “quote”": "naive quote"}
    for text, want in cases.items():
        ids = tok.encode(text)
        assert tok.decode(ids) == want and all(2 <= i < 97 for i in ids)
    printable = "".join(chr(c) for c in range(32, 127))
    assert tok.decode(tok.encode(printable)) == printable
