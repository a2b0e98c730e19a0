"""Hostile and broken model files: each is refused with an esolm error (API) and one line + exit 2 (CLI),
before any work; nothing in them runs, no output file is overwritten, and memory stays bounded.

Every case is a file (or folder) built in ``tmp_path``; ``ERROR_CASES`` must be refused with a message
matching the case's pattern, ``FINE_CASES`` must load. Memory bombs are also loaded in a child process
whose peak RSS (``RUSAGE_CHILDREN`` of a small wrapper process) is compared with loading a valid model.
"""

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from esolm import cli, io
from esolm.config import ModelConfig
from esolm.errors import CheckpointError, ConfigError, EsoLMError
from esolm.model.backbone import DiT

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a river city old new king music war north south early modern language people land sea".split()
HYDRA = {"model": {"hidden_size": 32, "cond_dim": 16, "n_blocks": 1, "n_heads": 2, "length": 16, "dropout": 0.0},
         "algo": {"name": "esolm", "diffusion_attn_mode": "causal", "alpha_0": 0.25}}
MARKER = "PWNED"  # the file a payload would create next to the checkpoint


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import random

    from esolm.data.tokenizers import train_bpe

    root = tmp_path_factory.mktemp("hostile")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(60)]
    (root / "docs.txt").write_text("\n\n".join(texts) + "\n")
    tok = train_bpe(texts, vocab_size=300, name="tiny-bpe")
    tok.save(root / "tok")
    cfg = io.config_from_authors(HYDRA, tok.vocab_size, tok.mask_id)
    torch.manual_seed(0)
    model = DiT(cfg)
    return {"root": root, "tok": tok, "cfg": cfg, "state": {k: v.clone() for k, v in model.state_dict().items()}}


# ------------------------------------------------------------------ building blocks


class Payload:
    """Unpickling this calls ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch(path):
    Path(path).write_text("ran")


def authors_pt(d: Path, ws, extra=None, *, legacy=False, state=None, name="model.pt") -> Path:
    """A fixture-style checkpoint (state dict + the authors' config), ``extra`` in its hyper-parameters."""
    ckpt = {"state_dict": state if state is not None else ws["state"], "config": HYDRA,
            "vocab_size": ws["tok"].vocab_size, "mask_index": ws["tok"].mask_id, "hyper_parameters": {"x": extra}}
    torch.save(ckpt, d / name, _use_new_zipfile_serialization=not legacy)
    return d / name


def with_data_pkl(path: Path, data: bytes) -> Path:
    """The ``torch.save`` zip archive ``path`` (an empty one if it does not exist) with its pickle replaced by
    ``data``, its other records kept."""
    if not path.exists():
        torch.save({}, path)
    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, b in records.items():
            z.writestr(n, data if n.endswith("/data.pkl") else b)
    return path


def esolm_folder(d: Path, ws, *, model_cfg=None, state=None, header=None, raw=None) -> Path:
    """An esolm folder: ``config.json`` (``model_cfg`` overrides the config), and weights from ``state``
    or a hand-made safetensors file (``header`` dict + ``raw`` data bytes)."""
    folder = d / "m"
    folder.mkdir()
    cfg = {**ws["cfg"].to_dict(), **(model_cfg or {})}
    (folder / "config.json").write_text(json.dumps({"format": "esolm", "version": 1, "model": cfg,
                                                    "method": {"name": "mdlm"}}))
    if header is not None:
        text = json.dumps(header).encode()
        (folder / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + (raw or b""))
    else:
        save_file(state if state is not None else ws["state"], str(folder / "model.safetensors"))
    return folder


def _nested_shared_lists(levels=13, width=8):
    x = [0] * width
    for _ in range(levels):
        x = [x] * width
    return x


def _self_referential():
    x = [1]
    x.append(x)
    return x


def _deep_pickle(depth=100_000) -> bytes:
    """``[[[...]]]`` ``depth`` levels deep (pushed flat, then appended inwards: no recursion to write it)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def _lying_storage(d: Path, numel: int) -> Path:
    """A checkpoint whose tensor storage claims ``numel`` elements; its record holds 1000 floats."""
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, d / "lie.pt")
    with zipfile.ZipFile(d / "lie.pt") as z:
        data = next(z.read(n) for n in z.namelist() if n.endswith("/data.pkl"))
    i = data.index(b"cpu") + 3
    j = data.index(b"M\xe8\x03", i)  # BININT2 1000 (the storage's numel) right after the location
    return with_data_pkl(d / "lie.pt", data[:j] + b"J" + numel.to_bytes(4, "little") + data[j + 3:])


def _state_with(ws, key, value):
    return {**ws["state"], key: value}


def _header(ws, **override):
    """A safetensors header for the base model's tensors (F32, contiguous), entries overridable."""
    header, offset = {}, 0
    for k, v in ws["state"].items():
        n = v.numel() * 4
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header.update(override)
    return header, offset


def _st_lying(ws, d, kind):
    header, size = _header(ws)
    key = "vocab_embed.embedding"
    start, end = header[key]["data_offsets"]
    if kind == "outside":
        header[key]["data_offsets"] = [start, size + 10**12]
    elif kind == "size":
        header[key]["shape"] = [header[key]["shape"][0] * 1000, header[key]["shape"][1]]
    elif kind == "overlap":
        other = next(k for k in header if k != key)
        header[other] = {**header[other], "data_offsets": [start, start + header[other]["data_offsets"][1]
                                                            - header[other]["data_offsets"][0]]}
    return esolm_folder(d, ws, header=header, raw=bytes(size))


def _hf_folder(d, ws, **override):
    folder = d / "hf"
    folder.mkdir()
    m = HYDRA["model"]
    meta = {"model_type": "EsoLM", "vocab_size": ws["tok"].vocab_size, "mask_index": ws["tok"].mask_id,
            "model_length": m["length"], "hidden_size": m["hidden_size"], "cond_dim": m["cond_dim"],
            "n_blocks": m["n_blocks"], "n_heads": m["n_heads"], "dropout": 0.0, **override}
    (folder / "config.json").write_text(json.dumps(meta))
    save_file({f"backbone.{k}": v for k, v in ws["state"].items()}, str(folder / "model.safetensors"))
    return folder


def _training_ckpt(d, ws, extra):
    from esolm.recipes import resolve

    run = resolve("cpu-tiny", ["model.n_layers=1", "data.length=16"]).to_dict()
    tok = ws["tok"]
    torch.save({"state_dict": {f"model.{k}": v for k, v in ws["state"].items()},
                "hyper_parameters": {"config": run, "vocab_size": tok.vocab_size, "mask_id": tok.mask_id, "x": extra},
                "esolm": {"consumed": 1, "method": {"name": "esolm", "variant": "B", "alpha0": 0.25},
                          "tokenizer_json": tok.backend.to_str(), "tokenizer_meta": tok.meta()}}, d / "last.ckpt")
    return d / "last.ckpt"


def _no_config(d, ws):
    (d / "empty").mkdir()
    return d / "empty"


def _bad_json(d, ws):
    folder = esolm_folder(d, ws)
    (folder / "config.json").write_text("{not json")
    return folder


def _escaping_shard(d, ws):
    folder = _hf_folder(d, ws)
    (folder / "model.safetensors").rename(d / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../outside.safetensors"}}))
    return folder


def _st_not_json(d, ws):
    folder = esolm_folder(d, ws)
    (folder / "model.safetensors").write_bytes((20).to_bytes(8, "little") + b"\xff" * 20 + bytes(64))
    return folder


def _garbage(d, ws):
    (d / "g.ckpt").write_bytes(b"\x00garbage" * 100)
    return d / "g.ckpt"


def _truncated(d, ws):
    path = authors_pt(d, ws)
    path.write_bytes(path.read_bytes()[:2000])
    return path


# name -> (builder(d, ws) -> path, pattern the one-line message must match)
ERROR_CASES = {
    "os.system payload": (lambda d, ws: authors_pt(d, ws, Payload(os.system, f"touch {d / MARKER}")),
                          r"refused: loading it would run code \(it calls posix\.system\)"),
    "os.system payload, legacy format": (
        lambda d, ws: authors_pt(d, ws, Payload(os.system, f"touch {d / MARKER}"), legacy=True),
        r"would run code \(it calls posix\.system\)"),
    "builtins.exec payload": (lambda d, ws: authors_pt(d, ws, Payload(exec, f"open({str(d / MARKER)!r}, 'w')")),
                              r"would run code \(it calls builtins\.exec\)"),
    "builtins.open payload": (lambda d, ws: authors_pt(d, ws, Payload(open, str(d / MARKER), "w")),
                              r"would run code \(it calls (io|builtins)\.open\)"),
    "subprocess payload": (lambda d, ws: authors_pt(d, ws, Payload(subprocess.call, ["touch", str(d / MARKER)])),
                           r"would run code \(it calls subprocess\.call\)"),
    "payload in a training checkpoint": (
        lambda d, ws: _training_ckpt(d, ws, Payload(os.system, f"touch {d / MARKER}")), r"posix\.system"),
    "bytearray(2.3e9) bomb": (lambda d, ws: authors_pt(d, ws, Payload(bytearray, 2_300_000_000)),
                              r"bytearray\(2300000000\)"),
    "bytearray bomb, legacy format": (lambda d, ws: authors_pt(d, ws, Payload(bytearray, 2_300_000_000), legacy=True),
                                      r"bytearray\(2300000000\)"),
    "shared nested lists (8^14 leaves)": (lambda d, ws: authors_pt(d, ws, _nested_shared_lists()),
                                          r"expands to more than 1,000,000"),
    "self-referential list": (lambda d, ws: authors_pt(d, ws, _self_referential()), r"contains itself"),
    "list nested 100000 deep": (lambda d, ws: with_data_pkl(d / "deep.pt", _deep_pickle()), r"nest deeper"),
    "tensor storage larger than the file": (lambda d, ws: _lying_storage(d, 2**31 - 1), r"claims 2,147,483,647"),
    "tensor storage larger than its record": (lambda d, ws: _lying_storage(d, 2000), r"corrupted or truncated"),
    "garbage .ckpt": (_garbage, r"corrupted or truncated"),
    "truncated .pt": (_truncated, r"corrupted or truncated"),
    "safetensors header length past the end": (lambda d, ws: _st_len(d, ws), r"header length"),
    "safetensors header not JSON": (_st_not_json, r"corrupt safetensors header"),
    "safetensors offsets outside the file": (lambda d, ws: _st_lying(ws, d, "outside"), r"outside the file"),
    "safetensors size does not match shape": (lambda d, ws: _st_lying(ws, d, "size"), r"needs .* bytes but"),
    "safetensors tensors overlap": (lambda d, ws: _st_lying(ws, d, "overlap"), r"overlap"),
    "safetensors NaN weights": (
        lambda d, ws: esolm_folder(d, ws, state=_state_with(ws, "blocks.0.attn_qkv.weight",
                                                            torch.full((96, 32), float("nan")))),
        r"'blocks\.0\.attn_qkv\.weight' holds NaN or infinite"),
    "safetensors int64 weights": (
        lambda d, ws: esolm_folder(d, ws, state=_state_with(ws, "blocks.0.norm1.weight",
                                                            torch.ones(32, dtype=torch.int64))),
        r"dtype I64; weights must be"),
    "pickled inf weights": (
        lambda d, ws: authors_pt(d, ws, state=_state_with(ws, "vocab_embed.embedding",
                                                          torch.full((300, 32), float("inf")))),
        r"holds NaN or infinite"),
    "pickled int weights": (
        lambda d, ws: authors_pt(d, ws, state=_state_with(ws, "blocks.0.norm2.weight",
                                                          torch.ones(32, dtype=torch.int32))),
        r"dtype torch\.int32; weights must be"),
    "safetensors shape of another model": (
        lambda d, ws: esolm_folder(d, ws, model_cfg={"hidden_size": 64, "cond_dim": 16}),
        r"checkpoint is for hidden_size 32 but config says 64"),
    "config: hidden 100000": (lambda d, ws: esolm_folder(d, ws, model_cfg={"hidden_size": 100_000, "n_heads": 10}),
                              r"parameters .* but only .* of memory is available"),
    "config: 100000 blocks": (lambda d, ws: esolm_folder(d, ws, model_cfg={"n_layers": 100_000, "hidden_size": 256}),
                              r"100000 blocks .* memory is available"),
    "config: vocabulary 1e9, hidden 4096": (
        lambda d, ws: esolm_folder(d, ws, model_cfg={"vocab_size": 10**9, "hidden_size": 4096, "n_heads": 32}),
        r"memory is available"),
    "config: length 1e9": (lambda d, ws: esolm_folder(d, ws, model_cfg={"length": 10**9}),
                           r"model length 1,000,000,000"),
    "config: no length": (lambda d, ws: _without_length(d, ws), r"lacks length"),
    "HF config: model_length 2^30": (lambda d, ws: _hf_folder(d, ws, model_length=1 << 30), r"model length"),
    "folder without config.json": (_no_config, r"no config\.json"),
    "config.json not JSON": (_bad_json, r"unreadable JSON"),
    "shard outside the folder": (_escaping_shard, r"not a file in the folder"),
    "missing relative path bad/x.ckpt": (lambda d, ws: Path("bad/x.ckpt"), r"bad/x\.ckpt does not exist"),
    "a FIFO (reading it would block)": (lambda d, ws: _fifo(d), r"neither a file nor a folder"),
}
FINE_CASES = {
    "unknown pickled function (kept inert)": lambda d, ws: authors_pt(d, ws, Payload(_touch, str(d / MARKER))),
    "valid authors' .pt": lambda d, ws: authors_pt(d, ws),
    "valid esolm folder": lambda d, ws: esolm_folder(d, ws),
    "bfloat16 esolm folder": lambda d, ws: esolm_folder(d, ws, state={k: v.bfloat16() for k, v in ws["state"].items()}),
}
MEMORY_BOMBS = ["bytearray(2.3e9) bomb", "bytearray bomb, legacy format", "shared nested lists (8^14 leaves)",
                "list nested 100000 deep", "config: hidden 100000", "config: 100000 blocks",
                "config: vocabulary 1e9, hidden 4096", "config: length 1e9"]


def _st_len(d, ws):
    folder = esolm_folder(d, ws)
    (folder / "model.safetensors").write_bytes((10**15).to_bytes(8, "little") + b"{}")
    return folder


def _without_length(d, ws):
    folder = esolm_folder(d, ws)
    meta = json.loads((folder / "config.json").read_text())
    del meta["model"]["length"]
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "model.ckpt")
    return d / "model.ckpt"


def _digest(path: Path) -> str:
    if not (path.is_file() or path.is_dir()):
        return ""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file())).hexdigest()


def _cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------ the cases


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_hostile_file_is_one_line_esolm_error(ws, case, tmp_path, monkeypatch, capsys):
    build, pattern = ERROR_CASES[case]
    monkeypatch.chdir(tmp_path)
    path = build(tmp_path, ws)
    before = _digest(tmp_path / path)
    for load in (io.load_model, io.load_pretrained):
        with pytest.raises(CheckpointError) as info:
            load(path)
        msg = str(info.value)
        assert "\n" not in msg and len(msg) < 600, msg
        assert re.search(pattern, msg), msg
    outputs = {"eval.json": "sentinel eval", "s.jsonl": "sentinel samples"}
    for name, text in outputs.items():
        (tmp_path / name).write_text(text)
    tok, data = ["--tokenizer", ws["root"] / "tok"], ["--data", ws["root"] / "docs.txt", "--val-fraction", "0.5"]
    for argv in (["eval", path, *tok, *data, "--json", "eval.json"], ["sample", path, *tok, "--out", "s.jsonl"],
                 ["export", path, "exported"]):
        rc, err = _cli(argv, capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"esolm {argv[0]}: error:"), err
        assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / MARKER).exists()  # nothing ran
    assert all((tmp_path / n).read_text() == t for n, t in outputs.items())  # nothing overwritten
    assert not (tmp_path / "exported").exists()
    assert _digest(tmp_path / path) == before


@pytest.mark.parametrize("case", list(FINE_CASES))
def test_benign_files_load_and_run_nothing(ws, case, tmp_path, capsys):
    path = FINE_CASES[case](tmp_path, ws)
    model = io.load_model(path, method={"name": "esolm", "variant": "B", "alpha0": 0.25}).model
    for k, v in model.state_dict().items():
        assert torch.equal(v.float(), ws["state"][k].to(v.dtype).float()), k
    tok, data = ["--tokenizer", ws["root"] / "tok"], ["--data", ws["root"] / "docs.txt", "--val-fraction", "0.5"]
    if model.vocab_embed.embedding.dtype == torch.float32:  # (a bfloat16 DiT cannot run on CPU yet: backbone)
        rc, err = _cli(["eval", path, *tok, *data, "--max-batches", "1", "--device", "cpu"], capsys)
        assert rc == 0, err
    assert not (tmp_path / MARKER).exists()


def test_inert_payload_is_recorded_not_called(ws, tmp_path):
    path = authors_pt(tmp_path, ws, Payload(_touch, str(tmp_path / MARKER)))
    extra = io.read_checkpoint(path)["hyper_parameters"]["x"]
    assert isinstance(extra, io.InertObject) and extra.qualname.endswith("._touch")
    assert extra.args == (str(tmp_path / MARKER),) and not (tmp_path / MARKER).exists()


_CHILD = """
import sys
from esolm.errors import EsoLMError
from esolm.io import load_model
try:
    load_model(sys.argv[1], method={"name": "mdlm"})
except EsoLMError as e:
    print("refused:", e)
"""
_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, r.returncode)")


def _peak_rss(path) -> tuple[int, int]:
    """Peak RSS (bytes) and exit code of a fresh Python loading ``path``, measured by a wrapper process."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable, "-c", _CHILD, str(path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    rss, rc = out.stdout.split()[-2:]
    return int(rss), int(rc)


@pytest.fixture(scope="module")
def baseline_rss(ws, tmp_path_factory):
    rss, rc = _peak_rss(esolm_folder(tmp_path_factory.mktemp("base"), ws))
    assert rc == 0
    return rss


@pytest.mark.parametrize("case", MEMORY_BOMBS)
def test_memory_bombs_stay_bounded(ws, case, tmp_path, baseline_rss):
    path = ERROR_CASES[case][0](tmp_path, ws)
    rss, rc = _peak_rss(path)
    assert rc == 0
    assert rss - baseline_rss < 1.5 * (1 << 30), f"{case}: peak RSS {rss / 2**30:.2f} GiB"


def test_pickle_budget_counts_shared_references(tmp_path):
    """The scan counts what copying the object would make: 8^6 shared leaves pass, 8^7 do not."""
    from esolm.io.safe_pickle import MAX_OBJECTS

    assert sum(8**i for i in range(7)) < MAX_OBJECTS < sum(8**i for i in range(8))
    for levels, ok in ((5, True), (6, False)):
        obj = _nested_shared_lists(levels=levels)
        path = with_data_pkl(tmp_path / f"budget{levels}.pt", pickle.dumps({"a": obj}, protocol=2))
        if ok:
            assert io.read_checkpoint(path)["a"] == obj
        else:
            with pytest.raises(EsoLMError, match="expands"):
                io.read_checkpoint(path)


def test_config_checks_do_not_build_the_model(monkeypatch):
    """The memory check is arithmetic on a one-block meta model: no DiT of the real size is ever built."""
    built = []
    real = DiT.__init__

    def spy(self, config):
        built.append(config.n_layers)
        real(self, config)

    monkeypatch.setattr(DiT, "__init__", spy)
    with pytest.raises(CheckpointError, match="memory is available"):
        io.check_config(ModelConfig(vocab_size=10**9, mask_id=0, hidden_size=4096, n_heads=32, n_layers=48), "x")
    assert built == [1]
    with pytest.raises(ConfigError, match="model length"):  # ModelConfig itself refuses it
        ModelConfig(length=1 << 21)
