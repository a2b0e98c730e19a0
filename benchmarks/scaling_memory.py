"""Memory and speed of the authors' scaling family (``nvidia/SDLLM-*``) as esolm runs it.

    python benchmarks/scaling_memory.py                       # the table of every size, nothing run
    python benchmarks/scaling_memory.py --run --dtype bfloat16 --device cuda
    python benchmarks/scaling_memory.py --run --size 2176x28   # one size (default: the largest that fits)
    python benchmarks/scaling_memory.py --run --length 128     # a shorter sequence (a CPU's minutes)

Without ``--run`` it prints, for each of the authors' model configs (``esolm.io.scaling.HEADS``, vocabulary
131,072 of their tiktoken tokenizer, length 1024): the parameters, the weight bytes in float32 and bfloat16, and
the KV cache per token (2 x layers x hidden x dtype size) and per full sequence. With ``--run`` it builds a random
model of the chosen size (weights are random: speed and memory do not depend on them), then measures one
full-length forward pass (batch ``--batch``) and a KV-cached Eso-LM (B) greedy generation of the whole length
one token per step (alpha0 = 1: the released model's setting; every step is one cached call), and reports
seconds, tokens/s and peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS).
The largest size whose weights take at most half the free memory is chosen when ``--size`` is not given.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from esolm.config import ModelConfig
from esolm.io.scaling import DEFAULT_LENGTH, HEADS, TIKTOKEN_MASK, TIKTOKEN_VOCAB
from esolm.io.weights import available_memory, parameter_count

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def config(hidden: int, blocks: int, length: int = DEFAULT_LENGTH) -> ModelConfig:
    return ModelConfig(vocab_size=TIKTOKEN_VOCAB, mask_id=TIKTOKEN_MASK, hidden_size=hidden, cond_dim=128,
                       n_layers=blocks, n_heads=HEADS[(hidden, blocks)], length=length)


def name(cfg: ModelConfig) -> str:
    return f"h{cfg.hidden_size}xL{cfg.n_layers}"


def table() -> list[dict]:
    rows = []
    for hidden, blocks in sorted(HEADS):
        cfg = config(hidden, blocks)
        params = parameter_count(cfg)
        kv = 2 * cfg.n_layers * cfg.hidden_size
        rows.append({"config": name(cfg), "hidden": hidden, "blocks": blocks, "heads": cfg.n_heads,
                     "params": params, "fp32_GiB": params * 4 / 2**30, "bf16_GiB": params * 2 / 2**30,
                     "kv_bytes_per_token_bf16": kv * 2, "kv_MiB_per_sequence_bf16": kv * 2 * cfg.length / 2**20})
    return rows


def pick(dtype: str, device: str, size: str | None, length: int = DEFAULT_LENGTH) -> ModelConfig:
    if size is not None:
        hidden, blocks = (int(x) for x in size.split("x"))
        return config(hidden, blocks, length)
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = available_memory() or 0
    fitting = [r for r in table() if r["params"] * BYTES[dtype] <= free / 2]
    if not fitting:
        raise SystemExit("no size fits in half the free memory")
    best = max(fitting, key=lambda r: r["params"])
    return config(best["hidden"], best["blocks"], length)


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(cfg: ModelConfig, dtype: str, device: str, batch: int) -> dict:
    from esolm.methods import as_method
    from esolm.model.backbone import DiT
    from esolm.sampling.api import generate
    from esolm.sampling.params import SamplingParams

    with torch.device(device):
        model = DiT(cfg).to(getattr(torch, dtype)).eval()
    x = torch.randint(4, cfg.vocab_size, (batch, cfg.length), device=device)
    model(x[:, :8])  # warm-up
    sync(device)
    t = time.perf_counter()
    model(x)
    sync(device)
    forward_s = time.perf_counter() - t
    method = as_method({"name": "esolm", "variant": "B", "alpha0": 1.0})
    params = SamplingParams(temperature=0.0, steps=cfg.length)
    generate(model, method, batch, params=params, max_length=16)  # warm-up
    sync(device)
    t = time.perf_counter()
    generate(model, method, batch, params=params)
    sync(device)
    decode_s = time.perf_counter() - t
    return {"config": name(cfg), "params": model.num_parameters(), "dtype": dtype, "device": device,
            "batch": batch, "length": cfg.length, "forward_s": forward_s,
            "forward_tokens_per_s": batch * cfg.length / forward_s, "decode_s": decode_s,
            "decode_tokens_per_s": batch * cfg.length / decode_s, "peak_GiB": peak_bytes(device) / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="build a random model and time it")
    ap.add_argument("--size", help="HIDDENxBLOCKS, e.g. 2176x28 (default: the largest that fits)")
    ap.add_argument("--dtype", choices=sorted(BYTES), default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=DEFAULT_LENGTH,
                    help=f"tokens of the timed forward pass and of the decoded sequence (default {DEFAULT_LENGTH})")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    out = {"table": table()}
    for r in out["table"]:
        print(f"{r['config']:>12} heads {r['heads']:>2}  {r['params'] / 1e9:6.3f}B params  "
              f"{r['fp32_GiB']:6.2f} GiB fp32  {r['bf16_GiB']:6.2f} GiB bf16  "
              f"KV {r['kv_bytes_per_token_bf16'] / 1024:6.1f} KiB/token bf16")
    if args.run:
        cfg = pick(args.dtype, args.device, args.size, args.length)
        out["measured"] = measure(cfg, args.dtype, args.device, args.batch)
        print(json.dumps(out["measured"], indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
