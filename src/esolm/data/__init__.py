"""Data: the embedded corpus (:mod:`.corpus`), tokenizers (:mod:`.tokenizers`), and tokenised, packed,
resumable datasets (:mod:`.datasets`)."""

from esolm.data.datasets import (
    DETOKENIZERS,
    HF_CORPORA,
    MODES,
    DataSplits,
    ResumableBatchSampler,
    SequenceDataset,
    build_datasets,
    default_cache_dir,
    is_validation,
    load_hf_texts,
    pack_documents,
    pad_documents,
    read_local_texts,
    source_texts,
    split_documents,
    tokenize_sequences,
)

__all__ = [
    "DETOKENIZERS", "HF_CORPORA", "MODES", "DataSplits", "ResumableBatchSampler", "SequenceDataset",
    "build_datasets", "default_cache_dir", "is_validation", "load_hf_texts", "pack_documents", "pad_documents",
    "read_local_texts", "source_texts", "split_documents", "tokenize_sequences",
]
