"""A sweep of hostile and unlucky input against esolm's CLI and Python API, with outcome counts.

Every case runs in a child process forked from a parent that has imported esolm (so each case costs a fork,
not a Python start), with an address-space limit and a time limit. A case expects either an error or
success; outcomes:

* ``clear error``   — expected error: exit 2 with one ``esolm CMD: error: ...`` line (CLI), or an esolm
  error type (API), whose message matches the case's pattern when it has one;
* ``misleading``    — a one-line error whose message does not say what is wrong (pattern not matched);
* ``traceback``     — an exception that is not an esolm error (CLI: a traceback; API: another type);
* ``accepted``      — an input that should have been refused ran to exit 0 / returned;
* ``killed``        — the child ran out of memory or time (memory/CPU bomb);
* ``fine`` / ``failed`` — for cases that should succeed.

Usage::

    python benchmarks/hostile_sweep.py --out benchmarks/results/hostile_sweep   # this checkout
    PYTHONPATH=/path/to/other/src python benchmarks/hostile_sweep.py --tag old  # another version

Results: ``OUT/<tag>.json`` (every case and outcome) and ``OUT/<tag>.md`` (counts per category).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

MEM_LIMIT = 6 << 30  # bytes of address space per case
TIME_LIMIT = 120  # seconds per case


@dataclass
class Case:
    category: str
    name: str
    argv: list[str] | None = None  # CLI arguments (``esolm ...``)
    code: str | None = None  # API: Python code run with ``W`` (workspace Path) and ``esolm`` imported
    expect: str = "error"  # error | ok
    pattern: str | None = None  # regex the error message must match (case-insensitive)
    outcome: str = ""
    detail: str = ""
    seconds: float = 0.0
    limit: int = TIME_LIMIT  # seconds before the case is killed
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Workspace: a tiny trained model and hostile files


def esolm_cli(*args: str, cwd: Path | None = None) -> None:
    subprocess.run([sys.executable, "-m", "esolm.cli", *args], check=True, cwd=cwd,
                   stdout=subprocess.DEVNULL)


def build_workspace(w: Path) -> None:
    import torch

    run = w / "run"
    esolm_cli("train", "cpu-tiny", f"trainer.out_dir={run}", "trainer.max_steps=4", "trainer.val_every=0",
              "trainer.ckpt_every=2", "trainer.logger=none")
    esolm_cli("export", str(run / "checkpoints" / "last.ckpt"), str(w / "model"))
    ckpt = (run / "checkpoints" / "last.ckpt").read_bytes()
    (w / "garbage.ckpt").write_bytes(os.urandom(4096))
    (w / "empty.ckpt").write_bytes(b"")
    (w / "truncated.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    (w / "a_file").write_text("not a folder\n")
    (w / "empty_folder").mkdir()
    task = w / "task_run"  # a (barely) trained arithmetic policy: chars tokenizer, the task's length
    esolm_cli("train", "task-arithmetic", f"trainer.out_dir={task}", "trainer.max_steps=2", "trainer.val_every=0",
              "trainer.ckpt_every=2", "trainer.logger=none", "trainer.progress=false")
    esolm_cli("export", str(task / "checkpoints" / "last.ckpt"), str(w / "task"))
    _task_files(w)

    class Payload:  # pickled as os.system("touch MARKER"): loading it must never run it
        def __reduce__(self):
            return (os.system, (f"touch {w / 'PWNED'}",))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Payload()}, w / "payload.ckpt")
    with open(w / "payload_legacy.pt", "wb") as fh:
        pickle.dump({"evil": Payload()}, fh, protocol=2)
    selfref: list = []
    selfref.append(selfref)
    torch.save({"state_dict": selfref}, w / "selfref.pt")
    node: list = [0]
    for _ in range(28):  # 2^28 leaves once expanded, a few hundred bytes on disk
        node = [node, node]
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": {"config": node}}, w / "bomb.pt")

    import safetensors.torch as st

    model = w / "model"
    base_cfg = json.loads((model / "config.json").read_text())
    weights = st.load_file(str(model / "model.safetensors"))

    def variant(name: str, cfg: dict | None = None, state: dict | None = None, raw: bytes | None = None) -> None:
        d = w / name
        d.mkdir()
        for f in model.iterdir():
            if f.name not in ("config.json", "model.safetensors"):
                (d / f.name).write_bytes(f.read_bytes())
        (d / "config.json").write_text(json.dumps(cfg if cfg is not None else base_cfg))
        if raw is not None:
            (d / "model.safetensors").write_bytes(raw)
        else:
            st.save_file(state if state is not None else weights, str(d / "model.safetensors"))

    nan = dict(weights)
    nan["vocab_embed.embedding"] = nan["vocab_embed.embedding"].clone()
    nan["vocab_embed.embedding"][0, 0] = float("nan")
    variant("nan_weights", state=nan)
    inf = dict(weights)
    inf["blocks.0.attn_qkv.weight"] = torch.full_like(inf["blocks.0.attn_qkv.weight"], float("inf"))
    variant("inf_weights", state=inf)
    variant("int_weights", state={k: v.to(torch.int32) if v.is_floating_point() else v for k, v in weights.items()})
    raw = (model / "model.safetensors").read_bytes()
    variant("truncated_safetensors", raw=raw[: len(raw) // 2])
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [10**6, 10**6]
    hb = json.dumps(header).encode()
    variant("lying_header", raw=len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    variant("bad_json", cfg=None)
    (w / "bad_json" / "config.json").write_text("{not json")
    for name, change in (("hidden_4096", {"hidden_size": 4096}), ("hidden_100000", {"hidden_size": 100000}),
                         ("length_1e9", {"length": 10**9}), ("length_4096", {"length": 4096}),
                         ("vocab_huge", {"vocab_size": 10**9, "mask_id": 10**9 - 1})):
        variant(name, cfg={**base_cfg, "model": {**base_cfg["model"], **change}})
    no_len = {k: v for k, v in base_cfg["model"].items() if k != "length"}
    variant("no_length", cfg={**base_cfg, "model": no_len})
    variant("broken_tokenizer")
    (w / "broken_tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    variant("no_method", cfg={k: v for k, v in base_cfg.items() if k != "method"})
    variant("bad_method", cfg={**base_cfg, "method": {"name": "esolm", "alpha0": 7}})

    from omegaconf import OmegaConf  # an authors'-style Lightning checkpoint (omegaconf config)

    fx = torch.load(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "authors_esolm_b.pt",
                    weights_only=True)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in fx["state_dict"].items()},
                "hyper_parameters": {"config": OmegaConf.create(fx["config"])}}, w / "authors.ckpt")
    ro = w / "readonly"
    ro.mkdir()
    ro.chmod(0o555)


# ----------------------------------------------------------------------------------------------------------
# Cases


def cases(w: Path) -> list[Case]:
    out: list[Case] = []
    M, CK = str(w / "model"), str(w / "run" / "checkpoints" / "last.ckpt")

    def cli(cat, name, argv, expect="error", pattern=None):
        out.append(Case(cat, name, argv=argv, expect=expect, pattern=pattern))

    def api(cat, name, code, expect="error", pattern=None):
        out.append(Case(cat, name, code=code, expect=expect, pattern=pattern))

    # -- train: bad configs (refused in validation, before any work) --
    bad = {
        "method.alpha0": ["-0.1", "1.5", "nan", "abc"], "method.batch_split": ["-1", "2"],
        "method.variant": ["C"], "method.name": ["foo"], "method.low_var": ["maybe"],
        "model.hidden_size": ["0", "-64", "63", "100000"], "model.n_heads": ["0", "3"], "model.n_layers": ["0"],
        "model.dropout": ["-0.1", "1.0"], "model.cond_dim": ["0"], "data.length": ["0", "2", "1000000000"],
        "data.mode": ["foo"], "data.val_fraction": ["0", "1"], "data.source": [str(w / "nope.txt")],
        "data.tokenizer": ["nope"], "data.max_documents": ["0"], "optim.lr": ["0", "-1"],
        "optim.betas": ["[1,1]", "[0.9]"], "optim.ema": ["1.0"], "optim.schedule": ["foo"],
        "optim.warmup_steps": ["-1"], "optim.grad_clip": ["-1"], "trainer.global_batch": ["0"],
        "trainer.devices": ["0"], "trainer.precision": ["fp8"], "trainer.accelerator": ["gpu", "tpu"],
        "trainer.strategy": ["foo"], "trainer.max_time": ["abc", "-1"], "trainer.max_steps": ["0"],
        "trainer.logger": ["foo"], "trainer.out_dir": [str(w / "a_file"), str(w / "a_file" / "sub"),
                                                       str(w / "readonly" / "run")],
        "trainer.keep_checkpoints": ["0"], "trainer.micro_batch": ["3"],
    }
    for key, values in bad.items():
        for v in values:
            out_dir = [] if key == "trainer.out_dir" else [f"trainer.out_dir={w / 'runs' / 'x'}"]
            cli("train config", f"{key}={v}", ["train", "cpu-tiny", *out_dir, f"{key}={v}"])
    for argv in (["train", "no-such-preset"], ["train", "cpu-tiny", "nokey"], ["train", "cpu-tiny", "foo.bar=1"],
                 ["train", "cpu-tiny", "model.nope=1"], ["train", str(w / "a_file")]):
        cli("train config", " ".join(argv[1:]), argv)
    cli("train config", "resume with changed lr", ["train", "cpu-tiny", f"trainer.out_dir={w / 'run'}",
                                                   "optim.lr=0.5", "trainer.max_steps=5"], pattern="lr")

    # -- model files through eval and sample --
    files = {
        "nonexistent": (str(w / "nope"), None), "relative missing": ("bad/x.ckpt", "exist|not found|no such"),
        "empty folder": (str(w / "empty_folder"), None), "a text file": (str(w / "a_file"), None),
        "garbage .ckpt": (str(w / "garbage.ckpt"), None), "empty .ckpt": (str(w / "empty.ckpt"), None),
        "truncated .ckpt": (str(w / "truncated.ckpt"), None),
        "pickle payload (zip)": (str(w / "payload.ckpt"), "code|refus|unsafe|not allowed|global"),
        "pickle payload (legacy)": (str(w / "payload_legacy.pt"), "code|refus|unsafe|not allowed|global"),
        "self-referential pickle": (str(w / "selfref.pt"), None),
        "shared-reference bomb": (str(w / "bomb.pt"), None),
        "NaN weights": (str(w / "nan_weights"), "finite|nan"), "inf weights": (str(w / "inf_weights"), "finite|inf"),
        "integer weights": (str(w / "int_weights"), "float|dtype|int"),
        "truncated safetensors": (str(w / "truncated_safetensors"), None),
        "lying safetensors header": (str(w / "lying_header"), None),
        "config not JSON": (str(w / "bad_json"), "json"),
        "hidden 4096 config": (str(w / "hidden_4096"), None), "hidden 100000 config": (str(w / "hidden_100000"), None),
        "length 1e9": (str(w / "length_1e9"), "length"), "length 4096 (trained 32)": (str(w / "length_4096"), None),
        "vocab 1e9": (str(w / "vocab_huge"), None), "no length in config": (str(w / "no_length"), "length"),
        "broken tokenizer.json": (str(w / "broken_tokenizer"), "tokenizer"),
        "no method saved": (str(w / "no_method"), "method"), "bad method saved": (str(w / "bad_method"), "alpha0"),
        "authors' Lightning .ckpt (vocab 101, no tokenizer)": (str(w / "authors.ckpt"), "tokenizer"),
    }
    ro_ok = os.geteuid() != 0  # root writes through a read-only mode: those cases only run as a normal user
    if not ro_ok:
        out[:] = [c for c in out if "readonly" not in " ".join(c.argv or [])]
    for name, (path, pattern) in files.items():
        cli("model files", f"eval: {name}", ["eval", path, "--max-batches", "1"], pattern=pattern)
        cli("model files", f"sample: {name}", ["sample", path, "--num-samples", "1", "--out", str(w / "s.jsonl")],
            pattern=pattern)
        # load_pretrained returns (model, method or None) and needs no tokenizer: these files load fine there
        needs_more = name in ("broken tokenizer.json", "no method saved") or name.startswith("authors'")
        api("model files", f"load_pretrained: {name}", f"esolm.io.load_pretrained({path!r})",
            expect="ok" if needs_more else "error", pattern=pattern)
    cli("model files", "export: garbage", ["export", str(w / "garbage.ckpt"), str(w / "exp1")])
    cli("model files", "export: nonexistent", ["export", str(w / "nope.ckpt"), str(w / "exp2")])
    cli("model files", "export: payload", ["export", str(w / "payload.ckpt"), str(w / "exp3")])
    cli("model files", "export: out_dir is a file", ["export", CK, str(w / "a_file")])
    cli("model files", "export: read-only out_dir", ["export", CK, str(w / "readonly" / "exp")])

    # -- eval flags --
    for flags, pattern in ((["--iw-k", "0"], None), (["--iw-k", "-1"], None), (["--iw-k", "abc"], None),
                           (["--iw-k", "100000000"], "memory|GiB|refused|above"), (["--batch-size", "0"], None),
                           (["--batch-size", "-3"], None), (["--length", "0"], None), (["--length", "1000000"], None),
                           (["--device", "nope"], "device"), (["--device", "cuda"], "cuda|device"),
                           (["--max-batches", "0"], None), (["--iw-alpha0", "2"], "alpha0"),
                           (["--iw-chunk", "0"], None), (["--json", str(w / "empty_folder")], None),
                           (["--json", str(w / "a_file" / "x.json")], None),
                           (["--json", str(w / "readonly" / "x.json")], None), (["--data", str(w / "nope.txt")], None),
                           (["--val-fraction", "0"], None), (["--val-fraction", "1.5"], None),
                           (["--max-documents", "0"], None), (["--tokenizer", "nope"], None)):
        cli("eval flags", " ".join(flags), ["eval", M, "--max-batches", "1", *flags], pattern=pattern)
    cli("eval flags", "valid run", ["eval", M, "--max-batches", "1", "--iw-k", "1,2"], expect="ok")
    cli("eval flags", "valid run on the training .ckpt", ["eval", CK, "--max-batches", "1"], expect="ok")

    # -- sample flags --
    S = ["sample", M, "--out", str(w / "s.jsonl")]
    bad_utf8 = os.fsdecode(b"caf\xe9 \xff")
    for flags, pattern in ((["--prompt", bad_utf8], "utf|prompt"), (["--prompt", "x " * 400], "prompt|length|long"),
                           (["--top-p", "0"], "top"),
                           (["--top-p", "1.5"], "top"),
                           (["--top-p", "nan"], "top"), (["--top-p", "-1"], "top"), (["--num-samples", "0"], None),
                           (["--num-samples", "-1"], None), (["--steps", "0"], None), (["--steps", "-1"], None),
                           (["--alpha0", "-1"], "alpha0"), (["--alpha0", "2"], "alpha0"),
                           (["--alpha0", "nan"], "alpha0"),
                           (["--sampler", "foo"], "sampler"), (["--max-length", "0"], None),
                           (["--max-length", "100000"], None), (["--batch-size", "0"], None),
                           (["--device", "nope"], "device"), (["--device", "cuda"], "cuda|device"),
                           (["--tokenizer", "nope"], None), (["--judge-batch-size", "0"], None)):
        cli("sample flags", " ".join(flags)[:40], S + flags, pattern=pattern)
    for target, name in ((str(w / "empty_folder"), "a folder"), (str(w / "a_file" / "s.jsonl"), "under a file"),
                         (str(w / "readonly" / "s.jsonl"), "read-only")):
        cli("sample flags", f"--out {name}", ["sample", M, "--num-samples", "1", "--out", target])
        cli("sample flags", f"--summary {name}", ["sample", M, "--num-samples", "1", "--out", str(w / "s2.jsonl"),
                                                  "--summary", target])
    cli("sample flags", "valid run", ["sample", M, "--num-samples", "2", "--out", str(w / "ok.jsonl")], expect="ok")
    cli("sample flags", "special-token text in a prompt is plain text", S + ["--num-samples", "1", "--prompt",
                                                                           "<|mask|> <|endoftext|>"], expect="ok")
    cli("sample flags", "valid run with a prompt", S + ["--num-samples", "2", "--prompt", "The history of"],
        expect="ok")
    cli("sample flags", "valid run on the training .ckpt", ["sample", CK, "--num-samples", "1", "--out",
                                                            str(w / "ok2.jsonl")], expect="ok")

    # -- bench --
    for flags in (["--threads", "0"], ["--threads", "-2"], ["--vocab", "1"], ["--vocab", "0"], ["--lengths", "0"],
                  ["--lengths", "abc"], ["--methods", "foo"], ["--batch-size", "0"], ["--hidden", "0"],
                  ["--heads", "3"], ["--layers", "0"], ["--block-size", "0"], ["--repeats", "0"],
                  ["--device", "nope"], ["--json", str(w / "a_file" / "x.json")]):
        cli("bench flags", " ".join(flags), ["bench", "latency", "--lengths", "16", "--hidden", "32", "--heads", "2",
                                             "--layers", "1", "--vocab", "64", "--repeats", "1", *flags])
    cli("bench flags", "valid run", ["bench", "latency", "--lengths", "16", "--hidden", "32", "--heads", "2",
                                     "--layers", "1", "--vocab", "64", "--repeats", "1", "--methods", "esolm-b,ar"],
        expect="ok")

    # -- Python API: generate() --
    G = "from esolm.sampling import generate\nm, meth = esolm.io.load_pretrained(W / 'model')\n"
    for name, kw, pattern in (("num_samples=0", "num_samples=0", None), ("num_samples=-1", "num_samples=-1", None),
                              ("num_samples=1.5", "num_samples=1.5", None),
                              ("batch_size=0", "num_samples=2, batch_size=0", None),
                              ("steps=0", "num_samples=1, steps=0", None),
                              ("steps=1.5", "num_samples=1, steps=1.5", None),
                              ("steps=True", "num_samples=1, steps=True", None),
                              ("max_length=0", "num_samples=1, max_length=0", None),
                              ("max_length=10**6", "num_samples=1, max_length=10**6", None),
                              ("prompt id out of vocab", "num_samples=1, prompt_ids=[10**7]", None),
                              ("prompt id negative", "num_samples=1, prompt_ids=[-5]", None),
                              ("prompt holds the mask id", "num_samples=1, prompt_ids=[m.config.mask_id]", "mask"),
                              ("infill position out of range", "num_samples=1, infill={10**6: 3}", None),
                              ("infill negative position", "num_samples=1, infill={-1: 3}", None),
                              ("infill token out of vocab", "num_samples=1, infill={0: 10**7}", None),
                              ("eos_id out of vocab", "num_samples=1, eos_id=10**7", None),
                              ("top_p=nan", "num_samples=1, top_p=float('nan')", None),
                              ("top_p=0", "num_samples=1, top_p=0.0", None),
                              ("top_p=2", "num_samples=1, top_p=2.0", None),
                              ("alpha0=nan", "num_samples=1, alpha0=float('nan')", None),
                              ("alpha0=-1", "num_samples=1, alpha0=-1.0", None),
                              ("sampler='foo'", "num_samples=1, sampler='foo'", None),
                              ("method dict with bad alpha0", "num_samples=1, **{}", None)):
        code = G + (f"generate(m, meth, {kw})" if "bad alpha0" not in name else
                    "generate(m, {'name': 'esolm', 'alpha0': 5}, num_samples=1)")
        api("generate()", name, code, pattern=pattern)
    api("generate()", "valid call", G + "generate(m, meth, num_samples=2, steps=4, seed=0)", expect="ok")
    if not ro_ok:
        out[:] = [c for c in out if "readonly" not in " ".join(c.argv or [])]
    return out


def _task_files(w: Path) -> None:
    """Prompt, reward and config files for the rl / eval-task cases."""
    (w / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": f"{a}+{a}="}) for a in range(100, 108)) + "\n")
    (w / "mask_prompts.jsonl").write_text(json.dumps({"prompt": "<|mask|>="}) + "\n")  # 10 chars with BOS
    (w / "surrogate_prompts.jsonl").write_text('{"prompt": "12\\ud800+1="}\n')
    (w / "bigint_prompts.jsonl").write_text('{"prompt": "1+1=", "x": ' + "9" * 5000 + "}\n")
    (w / "deep_prompts.jsonl").write_text('{"prompt": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    (w / "mixed_prompts.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n"
                                           + json.dumps({"prompt": "123+456="}) + "\n")
    (w / "binary.yaml").write_bytes(os.urandom(512))
    rewards = {
        "r_ok": "def score(prompts, completions):\n    return [1.0 for _ in completions]\n",
        "r_hang": "import time\ndef score(prompts, completions):\n    time.sleep(10**6)\n",
        "r_syntax": "def score(prompts, completions)\n    return []\n",
        "r_import": "raise RuntimeError('boom at import')\ndef score(p, c):\n    return [0.0] * len(c)\n",
        "r_generator": "def score(prompts, completions):\n    yield 1.0\n    raise ValueError('in a generator')\n",
        "r_overflow": "def score(prompts, completions):\n    return [10**400] * len(completions)\n",
        "r_dict": "def score(prompts, completions):\n    return {i: 1.0 for i in range(len(completions))}\n",
        "r_exit": "import sys\ndef score(prompts, completions):\n    sys.exit(0)\n",
    }
    for name, code in rewards.items():
        (w / f"{name}.py").write_text(code)


# HTTP cases: the app in process (FastAPI's TestClient, lifespan included); a 4xx with a JSON error body is a
# clear error (raised as an esolm UserError), a 5xx or a 4xx without one is a traceback, a check that fails is an
# AssertionError (a silently wrong answer)
HTTP = """
import json
from fastapi.testclient import TestClient
from esolm.errors import UserError
from esolm.io import load_model
from esolm.serving.engine import Engine
from esolm.serving.server import create_app
L = load_model(W / "model")
ENGINE = Engine(L.model, L.method, max_batch=4, max_queue=8, eos_id=L.tokenizer.eos_id, bos_id=L.tokenizer.bos_id)
APP = create_app(ENGINE, model_name="t", tokenizer=L.tokenizer)
CLIENT = TestClient(APP)
CLIENT.__enter__()  # the app's lifespan: the engine thread runs until the case's process ends
def post(body=None, raw=None, path="/v1/completions"):
    raw = json.dumps(body).encode() if raw is None else raw  # as a JSON client sends it (non-ASCII escaped)
    r = CLIENT.post(path, content=raw, headers={"content-type": "application/json"})
    if 400 <= r.status_code < 500:
        try:
            err = r.json()["error"]
        except Exception:
            raise RuntimeError(f"HTTP {r.status_code} without a JSON error body: {r.text[:100]!r}")
        if len(r.content) > 10000:
            raise AssertionError(f"HTTP {r.status_code} echoes {len(r.content)} bytes back")
        raise UserError(f"HTTP {r.status_code}: " + " ".join(str(err.get('message'))[:200].split()))
    if r.status_code >= 500:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    return r.json()
"""

# lm-eval cases: the registered ``esolm`` model in process
LMEVAL = """
from lm_eval.api.instance import Instance
from esolm.integrations.lm_eval import EsoLMLM
def lm(**kw):
    return EsoLMLM(pretrained=str(W / "model"), **kw)
def ll(model, ctx, cont):
    return model.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])[0]
def gen(model, ctx, **kw):
    return model.generate_until([Instance("generate_until", {}, (ctx, {"until": ["\\n"], **kw}), 0)])[0]
"""


def new_surface_cases(w: Path) -> list[Case]:
    """The surfaces added after the first sweep: serve, lm-eval, rl, eval-task, speculative and trace output."""
    out: list[Case] = []
    M, T = str(w / "model"), str(w / "task")

    def cli(cat, name, argv, expect="error", pattern=None, limit=60):
        out.append(Case(cat, name, argv=argv, expect=expect, pattern=pattern, limit=limit))

    def api(cat, name, code, expect="error", pattern=None, limit=60):
        out.append(Case(cat, name, code=code, expect=expect, pattern=pattern, limit=limit))

    # -- serve: requests (unbounded work, oversized bodies, special tokens, silly numbers) --
    big = "a " * 5_000_000
    for name, body, pattern in (
            ("steps 1e9", {"prompt": "a", "max_tokens": 8, "steps": 10**9}, "steps"),
            ("strided steps 1e12", {"prompt": "a", "max_tokens": 8, "steps": 10**12, "schedule": "strided"}, "steps"),
            ("10 MB prompt", {"prompt": big, "max_tokens": 4}, "large|bytes|body|long"),
            ("10 MB infill text", {"prompt": "a", "max_tokens": 8, "infill": {"2": big}}, "large|bytes|body|fit"),
            ("seed 2**63", {"prompt": "a", "max_tokens": 4, "seed": 2**63}, "seed"),
            ("seed -1", {"prompt": "a", "max_tokens": 4, "seed": -1}, "seed"),
            ("temperature -1", {"prompt": "a", "max_tokens": 4, "temperature": -1.0}, "temperature"),
            ("top_p 2", {"prompt": "a", "max_tokens": 4, "top_p": 2.0}, "top_p"),
            ("n 0", {"prompt": "a", "max_tokens": 4, "n": 0}, "\\bn\\b"),
            ("n 1000", {"prompt": "a", "max_tokens": 4, "n": 1000}, "\\bn\\b"),
            ("max_tokens 0 without echo", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
            ("max_tokens 1e9", {"prompt": "a", "max_tokens": 10**9}, "max_tokens"),
            ("alpha0 2", {"prompt": "a", "max_tokens": 4, "alpha0": 2.0}, "alpha0"),
            ("schedule sideways", {"prompt": "a", "max_tokens": 4, "schedule": "sideways"}, "sampler|schedule"),
            ("stop: 5 strings", {"prompt": "a", "max_tokens": 4, "stop": list("abcde")}, "stop"),
            ("infill key not a position", {"prompt": "a", "max_tokens": 8, "infill": {"x": "b"}}, "infill"),
            ("infill past the end", {"prompt": "a", "max_tokens": 4, "infill": {"9": "b"}}, "infill"),
            ("unknown field", {"prompt": "a", "max_tokens": 4, "nope": 1}, "nope|extra"),
            ("model name of 10 MB", {"prompt": "a", "max_tokens": 4, "model": "m" * 10_000_000}, "model|large|body"),
            ("lone surrogate in the prompt", {"prompt": "a\ud800b", "max_tokens": 4}, "utf|surrogate|prompt")):
        api("serve requests", name, HTTP + f"post({body!r})", pattern=pattern)
    api("serve requests", "malformed JSON", HTTP + "post(raw=b'{\"prompt\": \"a\", ')", pattern="json")
    api("serve requests", "body not an object", HTTP + "post(raw=b'[1, 2]')", pattern="object|dict|valid")
    api("serve requests", "infill <|endoftext|> is plain text", HTTP
        + "r = post({'prompt': 'a', 'max_tokens': 12, 'infill': {'2': '<|endoftext|>'}, 'seed': 1})\n"
          "assert '<|endoftext|>' in r['choices'][0]['text'], r['choices'][0]", expect="ok")
    api("serve requests", "temperature 5e-324 acts greedy", HTTP
        + "a = post({'prompt': 'a', 'max_tokens': 8, 'temperature': 5e-324})['choices'][0]['text']\n"
          "b = post({'prompt': 'a', 'max_tokens': 8, 'temperature': 1e-300})['choices'][0]['text']\n"
          "c = post({'prompt': 'a', 'max_tokens': 8, 'temperature': 0})['choices'][0]['text']\n"
          "assert a == b == c, (a, b, c)", expect="ok")
    api("serve requests", "a valid request", HTTP + "post({'prompt': 'The history of', 'max_tokens': 8})",
        expect="ok")

    # -- lm-eval: model_args and requests --
    for name, code, pattern in (
            ("orders=10**8", "ll(lm(orders=10**8), 'the', ' cat')", "orders"),
            ("orders=100000", "ll(lm(orders=100000), 'the', ' cat')", "orders"),
            ("mc_num=10**8", "ll(lm(estimator='mc', mc_num=10**8), 'the', ' cat')", "mc_num"),
            ("seed=10**25", "lm(seed=10**25)", "seed"),
            ("max_gen_toks=-5", "lm(max_gen_toks=-5)", "max_gen_toks"),
            ("unknown model_arg", "lm(nope=1)", "nope"),
            ("lone surrogate in a context", "ll(lm(), 'a\\ud800', ' cat')", "utf|surrogate"),
            ("lone surrogate in generate_until", "gen(lm(), 'a\\ud800')", "utf|surrogate"),
            ("empty context and continuation", "ll(lm(), '', '')", "empty"),
            ("generate_until temperature -1", "gen(lm(), 'the', temperature=-1.0)", "temperature")):
        api("lm-eval", name, LMEVAL + code, pattern=pattern)
    api("lm-eval", "<|mask|> context is plain text", LMEVAL
        + "v, _ = ll(lm(), '<|mask|>', ' the')\nw, _ = ll(lm(), 'the', ' <|mask|>')\n"
          "assert -1000 < v < 0 and -1000 < w < 0, (v, w)", expect="ok")
    api("lm-eval", "pretrained=esolm-small (shipped name)", LMEVAL
        + "EsoLMLM(pretrained='esolm-small')", expect="ok")
    api("lm-eval", "a valid loglikelihood", LMEVAL + "ll(lm(), 'the', ' cat')", expect="ok")

    # -- eval-task and rl: counts, prompt files, reward files, names --
    E = ["eval-task", T, "arithmetic"]
    for flags, pattern in ((["--steps", "1000000000"], "steps"), (["--prompts", "1000000000"], "prompts"),
                           (["--temperature", "-1"], "temperature"), (["--top-p", "2"], "top")):
        cli("eval-task and rl", "eval-task " + " ".join(flags), E + flags, pattern=pattern)
    cli("eval-task and rl", "eval-task esolm-small (shipped name)", ["eval-task", "esolm-small", "arithmetic",
                                                                    "--prompts", "2"], expect="ok")
    cli("eval-task and rl", "eval-task a valid run", E + ["--prompts", "4"], expect="ok")
    R = ["rl", "arithmetic", f"policy={T}", "trainer.max_steps=1", "task.eval_every=0", "trainer.progress=false",
         "rl.group_size=2", "rl.prompts_per_step=2"]
    for over, pattern in (("rl.steps=1000000000", "steps"), ("rl.group_size=100000", "group_size|memory|large"),
                          ("rl.prompts_per_step=100000", "prompts_per_step|memory|large|prompts")):
        cli("eval-task and rl", over, [*R, f"trainer.out_dir={w / 'rl' / over}", over], pattern=pattern)
    custom = [*R, "task.name=null"]
    for name, prompts, reward, pattern, limit in (
            ("reward never returns", "prompts.jsonl", "r_hang.py:score", "time|reward", 120),
            ("reward with a syntax error", "prompts.jsonl", "r_syntax.py:score", "syntax|reward", 60),
            ("reward raising at import", "prompts.jsonl", "r_import.py:score", "reward|boom", 60),
            ("reward generator that raises", "prompts.jsonl", "r_generator.py:score", "reward", 60),
            ("reward values 10**400", "prompts.jsonl", "r_overflow.py:score", "reward|finite|large|overflow", 60),
            ("reward returning a dict", "prompts.jsonl", "r_dict.py:score", "reward|list|dict", 60),
            ("reward calling sys.exit(0)", "prompts.jsonl", "r_exit.py:score", "reward|exit", 60),
            ("prompt file: 5000-digit integer", "bigint_prompts.jsonl", "r_ok.py:score", "prompt|integer|digit", 60),
            ("prompt file: nesting 200000 deep", "deep_prompts.jsonl", "r_ok.py:score", "prompt|nest|deep", 60),
            ("prompt file: lone surrogate", "surrogate_prompts.jsonl", "r_ok.py:score", "utf|surrogate|prompt", 60)):
        cli("eval-task and rl", name, [*custom, f"trainer.out_dir={w / 'rl' / name.replace(' ', '_')}",
                                       f"task.prompts={w / prompts}", f"task.reward={w / reward}"],
            pattern=pattern, limit=limit)
    cli("eval-task and rl", "rl on a binary YAML", ["rl", str(w / "binary.yaml")], pattern="yaml|utf|decode|read")
    cli("eval-task and rl", "prompt file with <|mask|> text", [
        *custom, f"trainer.out_dir={w / 'rl' / 'mask'}", f"task.prompts={w / 'mask_prompts.jsonl'}",
        f"task.reward={w / 'r_ok.py'}:score"], expect="ok")
    cli("eval-task and rl", "prompts of different lengths", [
        *custom, f"trainer.out_dir={w / 'rl' / 'mixed'}", f"task.prompts={w / 'mixed_prompts.jsonl'}",
        f"task.reward={w / 'r_ok.py'}:score"], expect="ok")

    # -- sample: speculative draft lengths and trace output --
    S = ["sample", M, "--num-samples", "1", "--out", str(w / "spec.jsonl")]
    for k in ("1000000", str(10**12), str(10**30)):
        cli("speculative and trace", f"--speculative {k[:8]}", S + ["--speculative", k], pattern="speculative|draft")
    cli("speculative and trace", "--steps 1e9", S + ["--steps", "1000000000"], pattern="steps")
    for name, target, pattern in (("/sys", "/sys/t.html", "trace|writ|permission"),
                                  ("300-character name", str(w / ("t" * 300 + ".html")), "trace|name|long"),
                                  ("empty path", "", "trace|empty"), ("'-'", "-", "trace|-")):
        cli("speculative and trace", f"--trace-html {name}", S + ["--trace-html", target], pattern=pattern)
    cli("speculative and trace", "--out and --trace-html the same file",
        ["sample", M, "--num-samples", "1", "--out", str(w / "same.html"), "--trace-html", str(w / "same.html")],
        pattern="same|trace")
    loop = w / "loopdir"
    loop.mkdir(exist_ok=True)
    if not (loop / "esolm-small").is_symlink():
        (loop / "esolm-small").symlink_to(loop / "esolm-small")
    api("speculative and trace", "a local esolm-small that is a symlink loop",
        f"import os\nos.chdir({str(loop)!r})\nesolm.io.load_model('esolm-small')", pattern="esolm-small|link|loop")
    cli("speculative and trace", "speculative with a trace (valid)", S + ["--speculative", "3", "--trace-html",
                                                                         str(w / "spec.html")], expect="ok")
    return out


# ----------------------------------------------------------------------------------------------------------
# Running


def _is_esolm_error(exc: BaseException) -> bool:
    try:
        from esolm.errors import EsoLMError
        return isinstance(exc, EsoLMError)
    except ImportError:  # older layouts: esolm's ValueError subclasses
        return isinstance(exc, ValueError) and type(exc).__module__.startswith("esolm") and \
            type(exc) is not ValueError


def _child(case: Case, w: Path, result_path: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
    err = open(result_path + ".err", "w+")  # noqa: SIM115
    os.dup2(err.fileno(), 2)
    sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), write_through=True)
    res: dict = {}
    try:
        if case.argv is not None:
            from esolm.cli import main
            try:
                res["rc"] = int(main(case.argv) or 0)
            except SystemExit as e:  # argparse errors exit 2 with a usage line
                res["rc"] = e.code if isinstance(e.code, int) else 1
                res["argparse"] = True
        else:
            import esolm
            import esolm.io
            import esolm.sampling  # noqa: F401
            exec(case.code, {"esolm": esolm, "W": w, "__name__": "__sweep__"})
            res["rc"] = 0
    except BaseException as e:  # noqa: BLE001 - classified by the parent
        res["exc"] = type(e).__name__
        res["esolm_error"] = _is_esolm_error(e)
        res["msg"] = str(e).splitlines()[0][:300] if str(e) else ""
        res["tb"] = traceback.format_exc()[-2000:]
    sys.stderr.flush()
    err.flush()
    Path(result_path).write_text(json.dumps(res))
    os._exit(0)


def classify(case: Case, res: dict | None, stderr: str, killed: str | None) -> tuple[str, str]:
    if killed:
        return "killed", killed
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if case.argv is not None:
        rc = res.get("rc") if res else None
        if res and "exc" in res:
            return ("traceback", f"{res['exc']}: {res['msg']}")
        err_lines = [ln for ln in lines if re.match(r"^(esolm\b.*error:|usage:)", ln)]
        if case.expect == "ok":
            return ("fine", "") if rc == 0 else ("failed", (err_lines or lines or [""])[-1][:200])
        if rc == 0:
            return "accepted", ""
        if "Traceback" in stderr:
            return "traceback", lines[-1][:200] if lines else ""
        if rc == 2 and err_lines:
            msg = err_lines[-1]
            if res and res.get("argparse"):
                msg = lines[-1]
            if case.pattern and not re.search(case.pattern, msg, re.I):
                return "misleading", msg[:200]
            return "clear error", msg[:200]
        return "traceback", f"exit {rc}: " + (lines[-1][:200] if lines else "")
    if res and "exc" in res:
        if case.expect == "ok":
            return "failed", f"{res['exc']}: {res['msg']}"
        if not res["esolm_error"]:
            return "traceback", f"{res['exc']}: {res['msg']}"
        if case.pattern and not re.search(case.pattern, res["msg"], re.I):
            return "misleading", res["msg"][:200]
        return "clear error", res["msg"][:200]
    return ("fine", "") if case.expect == "ok" else ("accepted", "")


def run_case(case: Case, w: Path) -> None:
    fd, result = tempfile.mkstemp(prefix="case", dir=w)
    os.close(fd)
    Path(result).unlink()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            _child(case, w, result)
        finally:
            os._exit(1)
    killed = None
    deadline = time.monotonic() + case.limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            killed = f"over {case.limit} s"
            break
        time.sleep(0.02)
    case.seconds = round(time.perf_counter() - t0, 2)
    stderr = Path(result + ".err").read_text(errors="replace") if Path(result + ".err").exists() else ""
    res = json.loads(Path(result).read_text()) if Path(result).exists() else None
    if res is None and killed is None:
        killed = f"died ({'signal ' + str(os.WTERMSIG(status)) if os.WIFSIGNALED(status) else 'no result'}; " \
                 f"{stderr.strip().splitlines()[-1][:120] if stderr.strip() else 'memory limit?'})"
    case.outcome, detail = classify(case, res, stderr, killed)
    case.detail = detail.encode("utf-8", "backslashreplace").decode("utf-8")  # argv may hold surrogates
    for p in (result, result + ".err"):
        Path(p).unlink(missing_ok=True)


def report(all_cases: list[Case], tag: str, out: Path, pwned: bool) -> str:
    cats = list(dict.fromkeys(c.category for c in all_cases))
    kinds = ["clear error", "fine", "misleading", "accepted", "traceback", "killed", "failed"]
    rows = ["| category | cases | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    total = Counter()
    for cat in cats:
        cs = [c for c in all_cases if c.category == cat]
        cnt = Counter(c.outcome for c in cs)
        total.update(cnt)
        rows.append(f"| {cat} | {len(cs)} | " + " | ".join(str(cnt.get(k, 0)) for k in kinds) + " |")
    rows.append(f"| **all** | **{len(all_cases)}** | " + " | ".join(f"**{total.get(k, 0)}**" for k in kinds) + " |")
    bad = [c for c in all_cases if c.outcome not in ("clear error", "fine")]
    lines = [f"# Hostile-input sweep: {tag}", "", f"Cases: {len(all_cases)}; pickled code executed: "
             f"{'YES' if pwned else 'no'}.", "", *rows, ""]
    if bad:
        lines += ["## Cases not ending in a clear error / success", "", "| category | case | outcome | detail |",
                  "|---|---|---|---|"]
        lines += [f"| {c.category} | {c.name} | {c.outcome} | {c.detail.replace('|', '/')[:150]} |" for c in bad]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.md").write_text(text)
    (out / f"{tag}.json").write_text(json.dumps({"tag": tag, "pwned": pwned,
                                                 "cases": [asdict(c) for c in all_cases]}, indent=1))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/hostile_sweep")
    ap.add_argument("--tag", default="current")
    ap.add_argument("--only", default=None, help="regex: run only matching case names")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    import esolm.cli  # noqa: F401 - imported once in the parent; every case is a fork

    with tempfile.TemporaryDirectory(prefix="esolm-sweep-") as tmp:
        w = Path(tmp)
        build_workspace(w)
        todo = cases(w) + new_surface_cases(w)
        if args.only:
            todo = [c for c in todo if re.search(args.only, f"{c.category}: {c.name}")]
        for i, c in enumerate(todo):
            run_case(c, w)
            c.name = c.name.encode("utf-8", "backslashreplace").decode("utf-8")
            if c.argv:
                c.argv = [a.encode("utf-8", "backslashreplace").decode("utf-8") for a in c.argv]
            print(f"[{i + 1}/{len(todo)}] {c.category}: {c.name}: {c.outcome} {c.detail[:100]}", flush=True)
        pwned = (w / "PWNED").exists()
        (w / "readonly").chmod(0o755)
        print(report(todo, args.tag, Path(args.out), pwned))
    return 0


if __name__ == "__main__":
    sys.exit(main())
