"""``esolm serve MODEL``: an OpenAI-compatible HTTP server with continuous batching and a decoding-trace page.

MODEL is anything ``esolm sample`` reads (an exported folder or a training checkpoint) with its tokenizer
(or ``--tokenizer``). The server answers OpenAI's ``POST /v1/completions`` (streamed with ``"stream": true``: one
server-sent event per decoding step; ``logprobs``, ``echo``, ``suffix``, batched and token-id prompts) and
``POST /v1/chat/completions`` (when the tokenizer has a chat template, or ``--chat-template``), ``GET /v1/models``,
vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` (lm-eval's ``local-completions`` model scores over
them), ``GET /health``, Prometheus ``GET /metrics`` and the trace page at ``/`` (docs/serving.md). With
``--api-key`` (or ``ESOLM_API_KEY``) the API routes need ``Authorization: Bearer KEY``. SIGTERM or Ctrl-C
stops accepting connections and lets the requests in flight finish; the exit code is then 0 after SIGTERM,
130 after Ctrl-C (SIGINT), and 130 when a second Ctrl-C cut the drain short.

Examples::

    esolm serve runs/tiny/export --port 8000 --max-batch 32
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"prompt": "The history of", "max_tokens": 32, "stream": true}'
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading

from esolm.commands import _args
from esolm.errors import UserError

API_KEY_ENV = "ESOLM_API_KEY"  # the API key when --api-key is not given


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a save_pretrained folder or a training checkpoint (with its tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=_args.int_at_least(0), default=8000, help="TCP port (0: any free port)")
    p.add_argument("--max-batch", type=_args.positive_int, default=8,
                   help="requests decoded together in one network call per engine step")
    p.add_argument("--max-queue", type=_args.positive_int, default=64,
                   help="requests waiting for a slot before new ones get 429")
    p.add_argument("--max-body-bytes", type=_args.positive_int, default=None,
                   help="largest request body accepted; bigger ones get 413 before they are parsed (default 1 MiB)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or folder (default: saved with the model)")
    p.add_argument("--name", default=None, help="model name in the API (default: the MODEL argument)")
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:N, mps ... (default: the available accelerator, else cpu)")
    p.add_argument("--threads", type=_args.positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* and the tokenizer routes (default: "
                        f"${API_KEY_ENV}; /health, /metrics and the trace page stay open)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions (default: the tokenizer's, if it has one)")


def _api_key(given: str | None) -> str | None:
    """--api-key, else $ESOLM_API_KEY (unset or empty: no key); UserError for a key of only whitespace."""
    key = given if given is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and (not key.strip() or key != key.strip()):
        where = "--api-key" if given is not None else f"${API_KEY_ENV}"
        raise UserError(f"{where} must be a non-empty key without surrounding whitespace")
    return key


def _chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--chat-template: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it); UserError when that address cannot be had."""
    if port > 65535:
        raise UserError(f"--port must be in [0, 65535], got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _server(config):
    """A ``uvicorn.Server`` that records the stop signals it got (``.signals``) instead of re-raising them
    after its graceful shutdown (uvicorn re-raises them, so a cleanly drained SIGTERM killed the process: -15)."""
    import uvicorn

    class Server(uvicorn.Server):
        signals: list[int] = []

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
                yield
                return
            self.signals = []

            def on_signal(sig, frame):
                self.signals.append(sig)
                self.handle_exit(sig, frame)

            original = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server(config)


def run(args) -> int:
    import torch
    import uvicorn

    from esolm.devices import resolve_device
    from esolm.io import load_model
    from esolm.serving.engine import Engine
    from esolm.serving.server import MAX_BODY_BYTES, compile_chat_template, create_app

    device = resolve_device(args.device)
    api_key = _api_key(args.api_key)
    template = _chat_template(args.chat_template)
    if template is not None:
        compile_chat_template(template)  # refused before the model is loaded
    sock = _listen(args.host, args.port)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, tokenizer=args.tokenizer, device=device, require_tokenizer=True)
    tok = loaded.tokenizer
    engine = Engine(loaded.model, loaded.method, max_batch=args.max_batch, max_queue=args.max_queue,
                    eos_id=tok.eos_id, bos_id=tok.bos_id)
    name = args.name or str(args.model)
    app = create_app(engine, model_name=name, tokenizer=tok, max_body_bytes=args.max_body_bytes or MAX_BODY_BYTES,
                     api_key=api_key, chat_template=template)
    host, port = sock.getsockname()[:2]
    print(f"esolm serve: {name} ({loaded.method.label}, {device}) on http://{host}:{port} "
          f"(max batch {args.max_batch}, queue {args.max_queue}{', API key required' if api_key else ''})",
          file=sys.stderr, flush=True)
    server = _server(uvicorn.Config(app, log_level="info"))
    server.run(sockets=[sock])
    if server.force_exit or signal.SIGINT in server.signals:
        print("esolm: interrupted", file=sys.stderr)
        return 130
    return 0
