"""What a `/pooling` answer of the metaembed plugin costs per item: bytes on the wire, and the time to write it
(server: tensor -> JSON body) plus read it (client: JSON body -> float32 tensor), for today's JSON form (every
vector as JSON floats) against the budget asked for, as JSON floats or base64 of float32 / float16 / bfloat16.

    python benchmarks/serving_payload.py                       # the quickstart's and the 7B recipe's shapes

Random unit vectors (bytes do not depend on the weights; JSON's length depends a little on the digits). No vLLM
here: the bodies are built by the plugin's own code (`metaembed.serving.wire`) as the server builds them.
"""

import argparse
import json
import platform
import time

import torch

from metaembed.serving.wire import decode_tensor, encode_tensor

# (name, R_c, D, items per request)
SHAPES = {"quickstart": (16, 384, 64), "7B": (64, 3584, 16)}


def body(vectors: torch.Tensor, encoding: str, dtype: str) -> bytes:
    """The response body the server writes (the fields around the embeddings included)."""
    data = {
        "role": "candidate",
        "num_vectors": vectors.shape[1],
        "fingerprint": "0" * 16,
        "embeddings": encode_tensor(vectors, encoding, dtype),
    }
    return json.dumps({"request_id": "pooling-0" * 4, "created_at": 0, "data": data}).encode()


def measure(vectors: torch.Tensor, num_vectors: int, encoding: str, dtype: str, repeats: int) -> tuple:
    """(bytes per item, items per second written and read back)."""
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        payload = body(vectors[:, :num_vectors], encoding, dtype)
        back = decode_tensor(json.loads(payload)["data"]["embeddings"])
        times.append(time.perf_counter() - start)
    assert back.shape == (vectors.shape[0], num_vectors, vectors.shape[2])
    return len(payload) / vectors.shape[0], vectors.shape[0] / min(times[1:])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--budget", type=int, default=4, help="candidate vectors asked for (r_c)")
    parser.add_argument("--items", type=int, default=None, help="items per request (default: per shape)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}; best of {args.repeats} after a warm-up")
    print("| shape (R_c x D) | form | vectors | bytes / item | ratio to JSON, all | items / s (write + read) |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes:
        vectors_per_item, dim, items = SHAPES[name]
        items = args.items or items
        generator = torch.Generator().manual_seed(0)
        vectors = torch.nn.functional.normalize(torch.randn(items, vectors_per_item, dim, generator=generator), dim=-1)
        forms = [("JSON floats", vectors_per_item, "float", "float32")]
        budget = min(args.budget, vectors_per_item)
        forms += [("JSON floats", budget, "float", "float32")]
        forms += [
            (f"base64 {dtype}", k, "base64", dtype)
            for k in (vectors_per_item, budget)
            for dtype in ("float32", "float16", "bfloat16")
        ]
        reference = None
        for form, k, encoding, dtype in forms:
            size, rate = measure(vectors, k, encoding, dtype, args.repeats)
            reference = reference or size
            print(
                f"| {name} ({vectors_per_item} x {dim}) | {form} | {k} | {size:,.0f} | {size / reference:.4f} | "
                f"{rate:,.1f} |"
            )


if __name__ == "__main__":
    main()
