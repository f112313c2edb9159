"""Tensor-parallel LLM inference side by side, same weights: ours (examples/llm/generate.py,
jax_mlxdist's ring) against mlx-lm's own distributed generation (mlx-lm 0.32.2's Llama,
model.shard(group), generate_step, on MLX 0.32.4's ring backend).

    python benchmarks/llm.py --setup                       # once: .bench-venvs/mlx-lm
    python benchmarks/llm.py -n 1 2 4                      # a random ~100M float32 Llama
    python benchmarks/llm.py -n 2 --quantize affine        # the same, 4-bit (MLX-quantized)
    python benchmarks/llm.py --model DIR                   # any mlx-lm Llama checkpoint

Method. Without --model a random Llama is made by examples/llm/make_model.py (in the mlx-lm
venv, so MLX quantizes it), by default hidden 768, 12 layers, 12 heads, 4 key/value heads,
intermediate 2048, vocabulary 32000, tied embeddings: 100M parameters. Both sides shard it the
same way (q/k/v/gate/up all-to-sharded, o/down sharded-to-all; embeddings and head
replicated), decode greedily from the same prompt and, after one untimed warm-up generation,
time one generation: prefill tokens/s is the prompt length over the time until the first new
token is known, decode tokens/s the other new tokens over the time after it. Each run starts
fresh processes; for each pass and n the two run one after the other (A B A B). MLX's ranks
get a hostfile of ports held with SO_REUSEPORT until they exit (benchmarks/peers/common.py).
The tables show every pass (pass 1 / pass 2 ...) and the ratio of the medians; "same tokens"
says whether the two generated the same greedy tokens (float32 weights should).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLE = os.path.join(ROOT, "examples", "llm")
sys.path.insert(0, os.path.join(HERE, "peers"))

from common import reserve_port  # noqa: E402
from setup import setup, venv_python  # noqa: E402

VENV = "mlx-lm"
MODEL_100M = ["--hidden", "768", "--layers", "12", "--heads", "12", "--kv-heads", "4", "--intermediate", "2048",
              "--vocab", "32000"]


def last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no result line in:\n" + text[-3000:])


def run_ours(n: int, args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-P", "-m", "jax_mlxdist.launch", "-n", str(n), "--no-prefix",
           os.path.join(EXAMPLE, "generate.py"), *args, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if out.returncode:
        raise RuntimeError(f"ours, n = {n}, failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return last_json(out.stdout)


def run_mlx_lm(n: int, args: list[str], timeout: float) -> dict:
    cmd = [venv_python(VENV), os.path.join(HERE, "peers", "mlx_lm_rank.py"), *args]
    if n == 1:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode:
            raise RuntimeError(f"mlx-lm, n = 1, failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return last_json(out.stdout)
    # Held until the ranks exit: MLX binds them with SO_REUSEPORT and the holder never listens.
    ports = [reserve_port() for _ in range(n)]
    fd, hostfile = tempfile.mkstemp(prefix="bench-mlx-lm-hosts-", suffix=".json")
    procs = []
    try:
        with os.fdopen(fd, "w") as f:
            json.dump([[f"127.0.0.1:{s.getsockname()[1]}"] for s in ports], f)
        logs = [tempfile.TemporaryFile("w+") for _ in range(n)]
        for r in range(n):
            procs.append(subprocess.Popen(cmd, env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": hostfile},
                                          stdout=logs[r], stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True))
        for p in procs:
            p.wait(timeout=timeout)
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
        if any(p.returncode for p in procs):
            raise RuntimeError(f"mlx-lm, n = {n}, failed:\n" + "\n".join(t[-2000:] for t in texts))
        return last_json(texts[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for s in ports:
            s.close()
        os.unlink(hostfile)


def make_model(path: str, a) -> None:
    flags = a.make.split() if a.make else MODEL_100M
    flags += ["--dtype", a.dtype] + (["--quantize", a.quantize] if a.quantize else [])
    flags += ["--bits", str(a.bits)] if a.bits else []
    subprocess.run([venv_python(VENV), os.path.join(EXAMPLE, "make_model.py"), path, *flags], check=True)


def fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def table(results: dict, ranks: list[int]) -> str:
    rows = ["| n | ours prefill (tokens/s) | mlx-lm prefill | ours decode (tokens/s) | mlx-lm decode | "
            "decode ours / mlx-lm | prefill ours / mlx-lm | same tokens |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in ranks:
        ours, theirs = results[n]["ours"], results[n]["mlx-lm"]
        if not ours or not theirs:
            continue
        col = lambda rs, k: " / ".join(fmt(r[k]) for r in rs)
        med = lambda rs, k: statistics.median(r[k] for r in rs)
        same = all(o["tokens"] == t["tokens"] for o, t in zip(ours, theirs))
        rows.append(f"| {n} | {col(ours, 'prefill_tps')} | {col(theirs, 'prefill_tps')} | "
                    f"{col(ours, 'decode_tps')} | {col(theirs, 'decode_tps')} | "
                    f"{med(ours, 'decode_tps') / med(theirs, 'decode_tps'):.2f}x | "
                    f"{med(ours, 'prefill_tps') / med(theirs, 'prefill_tps'):.2f}x | {'yes' if same else 'NO'} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true", help=f"make .bench-venvs/{VENV} and exit")
    p.add_argument("-n", type=int, nargs="+", default=[1, 2, 4], help="rank counts (default 1 2 4)")
    p.add_argument("--model", help="an mlx-lm Llama checkpoint (default: make a random one)")
    p.add_argument("--make", help="make_model.py size flags (default: the 100M model above)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quantize", choices=["affine", "mxfp4", "mxfp8", "nvfp4"])
    p.add_argument("--bits", type=int)
    p.add_argument("--prompt", type=int, default=64, help="prompt length in tokens")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--impls", nargs="+", default=["ours", "mlx-lm"], choices=["ours", "mlx-lm"])
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one generation run may take")
    p.add_argument("--json", metavar="PATH", help="save every run's result")
    a = p.parse_args()

    if a.setup:
        setup([VENV])
        return
    if not os.path.exists(venv_python(VENV)):
        sys.exit(f"{venv_python(VENV)} is missing: run `python benchmarks/llm.py --setup`")
    tmp = tempfile.TemporaryDirectory(prefix="bench-llm-")
    model = a.model
    if model is None:
        model = os.path.join(tmp.name, "model")
        make_model(model, a)
    prompt = [(7 * i + 3) % 1000 + 1 for i in range(a.prompt)]
    args = ["--model", model, "--prompt-tokens", *map(str, prompt), "--max-tokens", str(a.max_tokens)]
    run = {"ours": run_ours, "mlx-lm": run_mlx_lm}
    results = {n: {impl: [] for impl in ("ours", "mlx-lm")} for n in a.n}
    for pass_ in range(a.passes):
        for n in a.n:
            for impl in a.impls:
                r = run[impl](n, args, a.timeout)
                results[n][impl].append(r)
                print(f"pass {pass_ + 1}, n = {n}, {impl}: prefill {fmt(r['prefill_tps'])} tokens/s, "
                      f"decode {fmt(r['decode_tps'])} tokens/s", flush=True)
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    q = config.get("quantization")
    print(f"\nmodel: {model if a.model else 'random Llama'}, hidden {config['hidden_size']}, "
          f"{config['num_hidden_layers']} layers, {config['num_attention_heads']} heads "
          f"({config['num_key_value_heads']} kv), intermediate {config['intermediate_size']}, "
          f"vocabulary {config['vocab_size']}, {config.get('torch_dtype', '?')}"
          f"{', ' + q['mode'] + ' ' + str(q['bits']) + '-bit' if q else ''}; prompt {a.prompt} tokens, "
          f"{a.max_tokens} new; {os.cpu_count()} cores, Python {platform.python_version()}\n")
    print(table(results, a.n))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "config": config, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
