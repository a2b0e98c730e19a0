"""Train the shipped 8k byte-level BPE (``src/esolm/assets/esolm-bpe-8k.json``) on the embedded corpus.

    python scripts/train_bpe8k.py

Deterministic given the corpus (HF ``tokenizers`` BPE training has no randomness); the output is
committed so that installs never need to retrain.
"""

from esolm.data.corpus import wiki_texts
from esolm.data.tokenizers import BPE8K_FILE, train_bpe


def main() -> None:
    tok = train_bpe(wiki_texts(), vocab_size=8192, name="esolm-bpe-8k")
    BPE8K_FILE.parent.mkdir(parents=True, exist_ok=True)
    BPE8K_FILE.write_text(tok.backend.to_str())
    n = sum(len(ids) for ids in tok.encode_batch(wiki_texts()))
    print(f"wrote {BPE8K_FILE} (vocab {tok.vocab_size}, mask {tok.mask_id}, eos {tok.eos_id});"
          f" corpus = {n} tokens")


if __name__ == "__main__":
    main()
