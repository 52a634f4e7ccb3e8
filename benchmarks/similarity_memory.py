"""Peak memory of the training similarity (all Matryoshka groups, forward + backward) as the batch grows.

`matryoshka_maxsim` holds at most one block of token similarities (plus one of gradient weights in the backward),
so beyond its inputs, their gradients and the (G, B, N) scores, its memory stays flat. A direct einsum
materialises [B, N, R_q, R_c] floats and grows with B * N. Each measurement runs in a fresh process (peak resident
memory on CPU, `max_memory_allocated` on CUDA) and reports memory above the inputs and their gradients.

    python benchmarks/similarity_memory.py                         # CPU, D=256, batches 64..1024
    python benchmarks/similarity_memory.py --device cuda --dim 3584 --batches 256 512 1024 2048
"""

import argparse
import json
import resource
import subprocess
import sys

GROUPS = [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]


def measure(method: str, batch: int, dim: int, device: str, block_mb: int) -> float:
    """MiB used above inputs + input gradients, by one forward + backward of the method (run in this process)."""
    import torch

    from metaembed_training.similarity import matryoshka_maxsim

    torch.manual_seed(0)
    queries = torch.randn(batch, 16, dim, device=device).requires_grad_()
    candidates = torch.randn(2 * batch, 64, dim, device=device).requires_grad_()  # positives + one hard negative each
    grads_bytes = 2 * (queries.numel() + candidates.numel()) * 4
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        torch.zeros(1).sum()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if method == "ours":
        scores = matryoshka_maxsim(queries, candidates, GROUPS, max_block_bytes=block_mb * 1024 * 1024)
    else:  # direct: one einsum at the largest group, prefix slices per group (what most peers do)
        tokens = torch.einsum("qid,cjd->qcij", queries, candidates)  # [B, N, R_q, R_c]
        scores = torch.stack([tokens[:, :, :a, :b].amax(-1).sum(-1) for a, b in GROUPS])
    scores.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(0.0, (peak - base - grads_bytes) / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block-mb", type=int, default=128, help="bound on one block of token similarities")
    parser.add_argument("--direct-limit-gib", type=float, default=4.0, help="skip the direct einsum above this")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.dim, args.device, args.block_mb)))
        return

    def run(method, batch):
        command = [
            sys.executable,
            __file__,
            "--child",
            method,
            str(batch),
            "--dim",
            str(args.dim),
            "--device",
            args.device,
            "--block-mb",
            str(args.block_mb),
        ]
        return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)

    print(
        f"device {args.device}, D={args.dim}, groups {GROUPS}, B queries x 2B candidates, block bound "
        f"{args.block_mb} MiB; MiB above inputs and their gradients"
    )
    print(f"{'B':>6} {'scores (G,B,2B)':>16} {'ours':>10} {'direct einsum':>14} {'direct / ours':>14}")
    for batch in args.batches:
        scores_mib = len(GROUPS) * batch * 2 * batch * 4 / 2**20
        ours = run("ours", batch)
        direct_gib = batch * 2 * batch * 16 * 64 * 4 / 2**30
        direct = run("direct", batch) if direct_gib <= args.direct_limit_gib else None
        direct_text = f"{direct:14.0f}" if direct is not None else f"{'(>' + str(args.direct_limit_gib) + ' GiB)':>14}"
        ratio = f"{direct / max(ours, 1):13.1f}x" if direct is not None else f"{'':>14}"
        print(f"{batch:>6} {scores_mib:>16.1f} {ours:>10.0f} {direct_text:>14} {ratio}")


if __name__ == "__main__":
    main()
