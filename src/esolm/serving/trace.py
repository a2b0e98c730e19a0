"""Offline decoding traces: the streaming events of one sample of ``esolm.generate(..., trace=True)``, and a
self-contained HTML page (the trace page of ``esolm serve`` with its CSS/JS inlined) that draws them.

The events are the dicts of the ``/v1/completions`` stream (``esolm`` field: ``start``, one ``step`` per
network call, ``done``), so the page reads an offline trace and a live stream the same way.

Each event is read off a typed :class:`~esolm.sampling.common.Step` record as it is: its positions and its
phase, which the decoder's plan set (nothing is reconstructed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from esolm.data.tokenizers import Tokenizer
from esolm.io.atomic import atomic_write
from esolm.sampling.api import GenerationOutput

STATIC = Path(__file__).resolve().parent / "static"
_CSS_LINK = '<link rel="stylesheet" href="/static/trace.css">'
_JS_TAG = '<script src="/static/trace.js"></script>'


def _envelope(kind: str, index: int, model: str, created: int, esolm: dict, text: str = "",
              finish_reason: str | None = None) -> dict:
    return {"object": "text_completion", "id": f"offline-{created}", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason}],
            "esolm": {"event": kind, "index": index, **esolm}}


def events_from_generation(output: GenerationOutput, tokenizer: Tokenizer, *, sample: int = 0,
                           model: str = "esolm") -> list[dict]:
    """``start``, ``step`` (one per network call) and ``done`` events of sample ``sample`` of ``output``.

    ``output``: one batch of ``generate(..., trace=True)`` (a call that decides nothing for this sample, as
    an MDLM ancestral step can, is an event with no positions). Tokens are those of the final sample (after an EOS cut:
    EOS). The prompt is the given prefix (positions before the first decoded one). ``tokens_per_second`` is
    this sample's decoded tokens over the batch's sampling time.
    """
    if output.trace is None or output.num_batches != 1:
        raise ValueError("events_from_generation needs one batch of generate(..., trace=True)")
    tokens = output.tokens[sample].tolist()
    length = len(tokens)
    steps = [(s.phase, s.row(sample)) for s in output.trace[0]]
    decided = sorted(p for _, c in steps for p in c)
    prompt_length = decided[0] if decided else length

    def text(i: int) -> str:
        return tokenizer.decode([i], skip_special_tokens=False)

    created = int(time.time())
    events = [_envelope("start", 0, model, created, {
        "prompt_tokens": [text(i) for i in tokens[:prompt_length]], "prompt_length": prompt_length,
        "length": length})]
    for k, (phase, pos) in enumerate(steps):
        ids = [tokens[p] for p in pos]
        events.append(_envelope("step", 0, model, created, {
            "step": k, "phase": phase, "positions": pos, "tokens": ids,
            "token_texts": [text(i) for i in ids], "nfe": k + 1}))
    end = length if output.lengths is None else int(output.lengths[sample])
    completion = tokenizer.decode(tokens[prompt_length:end])
    seconds = float(output.seconds)
    events.append(_envelope("done", 0, model, created, {
        "nfe": len(steps), "seconds": seconds,
        "tokens_per_second": len(decided) / seconds if seconds > 0 else None},
        text=completion, finish_reason="stop" if end < length else "length"))
    return events


def _script_json(events: list[dict]) -> str:
    """``events`` as JSON safe inside a ``<script>`` element (no ``<``, no raw line separators)."""
    raw = json.dumps(events, ensure_ascii=False)
    return raw.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render_trace_html(events: list[dict], title: str = "esolm decoding trace") -> str:
    """The trace page with its CSS and JS inlined and ``events`` embedded as ``window.ESOLM_TRACE``."""
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    css = (STATIC / "trace.css").read_text(encoding="utf-8")
    js = (STATIC / "trace.js").read_text(encoding="utf-8")
    for name, body, end in (("trace.css", css, "</style"), ("trace.js", js, "</script")):
        if end in body.lower():
            raise ValueError(f"{name} contains {end}: it cannot be inlined")
    esc = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    page = page.replace("<title>esolm decoding trace</title>", f"<title>{esc}</title>")
    page = page.replace(_CSS_LINK, f"<style>\n{css}</style>")
    data = f"<script>window.ESOLM_TRACE = {_script_json(events)};</script>\n"
    return page.replace(_JS_TAG, f"{data}<script>\n{js}</script>")


def write_trace_html(path, events: list[dict], title: str = "esolm decoding trace") -> Path:
    """Write :func:`render_trace_html` to ``path`` atomically; returns the path."""
    return atomic_write(path, render_trace_html(events, title))
