"""Cost of the Matryoshka (MMR) loss against a single-group loss on the same batch, measured in one run.

All groups come from one forward pass and one late-interaction pass, so MMR should add only a few percent to a
training step. For one batch this prints the median time of a full training step (encode queries and candidates,
loss, backward) with the paper's five groups and with only the full group (16, 64), their ratio, and the same for
the loss alone (similarity + InfoNCE + backward through the embeddings).

    python benchmarks/mmr_loss_cost.py                       # CPU, a ~15M-parameter Qwen3-shaped random backbone
    python benchmarks/mmr_loss_cost.py --device cuda --batch-size 64 --hidden-size 2048
"""

import argparse
import statistics
import time

import torch
from common import sized_model  # benchmarks/common.py (the script folder is on sys.path)

from metaembed_training.data import MetaEmbedCollator
from metaembed_training.loss import MatryoshkaContrastiveLoss
from metaembed_training.synthetic import synthetic_records

PAPER_GROUPS = [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]


def interleaved_medians(functions: dict, repeats: int) -> dict:
    """Median seconds of each function, run in turns (A, B, A, B, ...) so machine drift hits both alike."""
    for fn in functions.values():
        fn()  # warm-up
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = sized_model(args.hidden_size, args.layers, args.device).train()
    records = synthetic_records(args.batch_size, seed=0, words_per_record=12)
    batch = MetaEmbedCollator(model.processor)(records)
    queries_in = {k: v.to(args.device) for k, v in batch["queries"][0]["inputs"].items()}
    candidates_in = {k: v.to(args.device) for k, v in batch["candidates"][0]["inputs"].items()}
    owners = batch["negative_owners"].to(args.device)
    losses = {
        "MMR (5 groups)": MatryoshkaContrastiveLoss(PAPER_GROUPS),
        "single group (16,64)": MatryoshkaContrastiveLoss([(16, 64)]),
    }

    def step(loss_fn):
        model.zero_grad(set_to_none=True)
        q = model(**queries_in, role="query").embeddings
        c = model(**candidates_in, role="candidate").embeddings
        loss, _ = loss_fn(q, c[: args.batch_size], c[args.batch_size :], owners)
        loss.backward()

    with torch.no_grad():
        q_fixed = model(**queries_in, role="query").embeddings
        c_fixed = model(**candidates_in, role="candidate").embeddings

    def loss_only(loss_fn):
        q, c = q_fixed.clone().requires_grad_(), c_fixed.clone().requires_grad_()
        loss, _ = loss_fn(q, c[: args.batch_size], c[args.batch_size :], owners)
        loss.backward()

    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"backbone: random qwen3, {parameters:.1f}M parameters, {args.layers} layers, device {args.device}; "
        f"batch {args.batch_size} queries + {args.batch_size} positives + {owners.numel()} hard negatives, "
        f"R_q=16, R_c=64; median of {args.repeats}"
    )
    print(f"{'':24} {'training step':>14} {'loss only':>12}")
    steps = interleaved_medians({name: (lambda f=f: step(f)) for name, f in losses.items()}, args.repeats)
    loss_times = interleaved_medians({name: (lambda f=f: loss_only(f)) for name, f in losses.items()}, args.repeats)
    results = {name: (steps[name], loss_times[name]) for name in losses}
    for name, (step_time, loss_time) in results.items():
        print(f"{name:24} {step_time * 1e3:11.1f} ms {loss_time * 1e3:9.2f} ms")
    (mmr_step, mmr_loss), (one_step, one_loss) = results.values()
    print(
        f"ratio MMR / single group: training step {mmr_step / one_step:.3f}, loss only {mmr_loss / one_loss:.3f}; "
        f"MMR's extra work is {(mmr_loss - one_loss) / one_step * 100:.1f}% of a single-group training step"
    )


if __name__ == "__main__":
    main()
