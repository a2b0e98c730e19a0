"""Load test of ``esolm serve`` on loopback: continuous batching (``--max-batch 32``) against ``--max-batch 1``.

For each server setting, a real ``esolm serve`` process is started on a free loopback port; then, for each
concurrency C, C clients each send streamed completions one after another (``--requests`` per client, and no
new request after ``--time-limit`` seconds of that level), with mixed ``max_tokens`` and distinct seeds.
Measured per (setting, C): completion tokens per second over the level's wall time, request latency
p50/p99, time to the first step event p50/p99, and the mean number of requests each network call served
(from the server's ``/health`` counters). Every request is sent to both settings with the same seed, so the
texts are compared too (identical up to float rounding of the batched network call).

    .venv/bin/python benchmarks/serve_load.py MODEL [--concurrency 1,4,16,32,64] [--batches 32,1]
        [--max-tokens 16,32,64] [--requests 2] [--threads 2] [--time-limit 120] [--out benchmarks/results/serve_load]

MODEL: anything ``esolm serve`` reads (an exported folder or a training checkpoint, with its tokenizer).
Writes OUT.md, OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
# json.dumps writes these exactly so, and a JSON string holds '"' only escaped: they can only be the keys
STEP, POSITIONS = '"event": "step"', '"positions": '
PROMPTS = ["The history of", "In the early", "A small town", "The river", "Scientists have", "During the war"]


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-quantile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


class Server:
    """``esolm serve MODEL`` in a child process on a free loopback port."""

    def __init__(self, model: str, max_batch: int, max_queue: int, threads: int, device: str | None):
        cmd = [sys.executable, "-m", "esolm.cli", "serve", model, "--host", "127.0.0.1", "--port", "0",
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--threads", str(threads)]
        if device:
            cmd += ["--device", device]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        line = ""
        while " on http://" not in line:
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit(f"esolm serve did not start (exit {self.proc.wait()})")
        self.url = line.split(" on ")[1].split()[0]
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise SystemExit("esolm serve did not answer /health")
            time.sleep(0.1)
        self.length = httpx.get(f"{self.url}/v1/models").json()["data"][0]["esolm"]["length"]
        # one unmeasured request: the first network calls pay one-time costs
        httpx.post(f"{self.url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4}, timeout=120)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed completion: latency, time to the first step event, tokens decided, final text."""
    t0 = time.perf_counter()
    first, tokens, text = None, 0, None
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if STEP in line:  # the frequent event, read without parsing it (the client shares the CPU)
                first = first if first is not None else time.perf_counter() - t0
                i = line.index("[", line.index(POSITIONS))
                j = line.index("]", i)  # positions are integers: the first "]" closes the list
                tokens += line.count(",", i, j) + 1 if j > i + 1 else 0
                continue
            event = json.loads(line[6:])
            info = event.get("esolm", {})
            if info.get("event") == "step":
                first = first if first is not None else time.perf_counter() - t0
                tokens += len(info["positions"])
            elif info.get("event") == "done":
                text = event["choices"][0]["text"]
            elif "error" in event:
                return {"error": event["error"]["message"]}
    return {"latency": time.perf_counter() - t0, "first_step": first, "tokens": tokens, "text": text}


def request_body(client: int, i: int, max_tokens: list[int], length: int) -> dict:
    """The ``i``-th request of ``client``: a prompt, a max_tokens of the mix, and a seed of its own."""
    k = client * 1000 + i
    prompt = PROMPTS[k % len(PROMPTS)]
    return {"prompt": prompt, "max_tokens": min(max_tokens[k % len(max_tokens)], length - 16), "seed": k}


async def level(url: str, concurrency: int, per_client: int, max_tokens: list[int], length: int,
                time_limit: float) -> tuple[list[dict], float]:
    """C clients, each sending up to ``per_client`` requests in turn; returns the results and the wall time."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None)) as client:
        t0 = time.perf_counter()

        async def run_client(c: int) -> list[dict]:
            out = []
            for i in range(per_client):
                if time.perf_counter() - t0 > time_limit:
                    break
                body = request_body(c, i, max_tokens, length)
                out.append({"key": f"{c}/{i}", **body, **await one_request(client, url, body)})
            return out

        results = await asyncio.gather(*(run_client(c) for c in range(concurrency)))
        return [r for rs in results for r in rs], time.perf_counter() - t0


def summarise(results: list[dict], seconds: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if "error" not in r]
    steps = after["steps"] - before["steps"]
    return {
        "requests": len(results), "errors": len(results) - len(ok), "seconds": seconds,
        "tokens": sum(r["tokens"] for r in ok),
        "tokens_per_second": sum(r["tokens"] for r in ok) / seconds if seconds > 0 else None,
        "latency_p50": percentile([r["latency"] for r in ok], 0.5),
        "latency_p99": percentile([r["latency"] for r in ok], 0.99),
        "first_step_p50": percentile([r["first_step"] for r in ok if r["first_step"] is not None], 0.5),
        "first_step_p99": percentile([r["first_step"] for r in ok if r["first_step"] is not None], 0.99),
        "network_calls": steps,
        "requests_per_call": (after["nfe"] - before["nfe"]) / steps if steps else None,
    }


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def plot(rows: list[dict], batches: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for j, b in enumerate(batches):
        rs = [r for r in rows if r["max_batch"] == b]
        cs = [r["concurrency"] for r in rs]
        color = f"C{j}"
        ax1.plot(cs, [r["tokens_per_second"] or 0 for r in rs], marker="o", color=color, label=f"--max-batch {b}")
        ax2.plot(cs, [r["latency_p50"] or 0 for r in rs], marker="o", color=color, label=f"--max-batch {b} p50")
        ax2.plot(cs, [r["latency_p99"] or 0 for r in rs], marker="x", linestyle="--", color=color,
                 label=f"--max-batch {b} p99")
    clients = sorted({r["concurrency"] for r in rows})
    for ax, ylabel in ((ax1, "completion tokens / s"), (ax2, "request latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("esolm serve, loopback load test")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a model esolm serve reads (with its tokenizer)")
    ap.add_argument("--concurrency", type=ints, default=[1, 4, 16, 32, 64], help="concurrent clients per level")
    ap.add_argument("--batches", type=ints, default=[32, 1], help="--max-batch settings compared")
    ap.add_argument("--max-tokens", type=ints, default=None,
                    help="max_tokens mix (default: L/8, L/4, L/2 of the model length L)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--time-limit", type=float, default=120.0, help="no new request after this many s per level")
    ap.add_argument("--threads", type=int, default=2, help="server torch CPU threads")
    ap.add_argument("--device", default=None, help="server torch device (default: esolm serve's)")
    ap.add_argument("--out", type=Path, default=RESULTS / "serve_load", help="output prefix (.md/.json/.png)")
    args = ap.parse_args()
    if min(args.concurrency) < 1 or min(args.batches) < 1 or args.requests < 1:
        ap.error("--concurrency, --batches and --requests must be positive")

    rows, texts = [], {}
    for b in args.batches:
        server = Server(args.model, b, max(args.concurrency) + 8, args.threads, args.device)
        try:
            length = server.length
            mix = args.max_tokens or [max(1, length // 8), max(1, length // 4), max(1, length // 2)]
            for c in args.concurrency:
                before = server.health()
                results, seconds = asyncio.run(level(server.url, c, args.requests, mix, length, args.time_limit))
                row = {"max_batch": b, "concurrency": c, **summarise(results, seconds, before, server.health())}
                rows.append(row)
                for r in results:
                    if r.get("text") is not None:
                        texts.setdefault((c, r["key"]), {})[b] = r["text"]
                print(f"max_batch={b:3d} C={c:3d}: {fmt(row['tokens_per_second'], '.1f')} tok/s, "
                      f"p50 {fmt(row['latency_p50'])} s, p99 {fmt(row['latency_p99'])} s, "
                      f"first step p50 {fmt(row['first_step_p50'], '.3f')} s, "
                      f"{fmt(row['requests_per_call'])} requests/call, {row['errors']} errors", flush=True)
        finally:
            server.close()

    both = [t for t in texts.values() if len(t) == len(args.batches)]
    same = sum(len(set(t.values())) == 1 for t in both)
    ref = args.batches[-1]
    speedup = {}
    for b in args.batches[:-1]:
        for c in args.concurrency:
            x = next(r for r in rows if r["max_batch"] == b and r["concurrency"] == c)["tokens_per_second"]
            y = next(r for r in rows if r["max_batch"] == ref and r["concurrency"] == c)["tokens_per_second"]
            speedup[f"{b}/{ref}@{c}"] = x / y if x and y else None

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "threads": args.threads, "device": args.device, "max_tokens": args.max_tokens,
            "requests_per_client": args.requests, "time_limit": args.time_limit, "python": platform.python_version(),
            "machine": platform.machine(), "command": " ".join(sys.argv)}
    report = {"meta": meta, "rows": rows, "speedup": speedup,
              "identical_texts": {"compared": len(both), "identical": same}}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# `esolm serve` load test (loopback)", "",
             f"Model `{args.model}`; server threads {args.threads}; {args.requests} streamed requests per client per "
             f"level (max_tokens mix {args.max_tokens or 'L/8, L/4, L/2'}); command `{meta['command']}`.", "",
             "| --max-batch | clients | requests | errors | tokens/s | latency p50 (s) | latency p99 (s) | "
             "first step p50 (s) | first step p99 (s) | requests per network call |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['max_batch']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{fmt(r['tokens_per_second'], '.1f')} | {fmt(r['latency_p50'])} | {fmt(r['latency_p99'])} | "
                     f"{fmt(r['first_step_p50'], '.3f')} | {fmt(r['first_step_p99'], '.3f')} | "
                     f"{fmt(r['requests_per_call'])} |")
    lines += ["", "Throughput ratio (tokens/s of the batched setting over `--max-batch "
              f"{ref}` at the same number of clients): "
              + ", ".join(f"{k}: {fmt(v)}x" for k, v in speedup.items()), "",
              f"Texts identical across settings (same request, same seed): {same} of {len(both)}.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    plot(rows, args.batches, args.out.with_suffix(".png"))
    print(f"wrote {args.out}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
