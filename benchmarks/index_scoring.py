"""MetaEmbedIndex scoring speed against the memory-bandwidth floor and against other scorers, in one run.

    python benchmarks/index_scoring.py                                  # CPU, CI-sized (N = 20,000, D = 384)
    python benchmarks/index_scoring.py --device cuda --num-items 100000 --dim 3584   # the paper's 7B shape, GPU

For each budget: the bytes one scan reads (N * r_c * D * 2, bf16), the floor that takes at the measured copy
bandwidth of the device, the single-query latency and the per-query time of a batch, each as a ratio to the
floor; then the same single-query search by the scorers installed beside ours on the same bf16 embeddings
(item-major [N, R_c, D], as they take them): sentence-transformers `maxsim`, a naive einsum, and PyLate /
colpali-engine where installed. Ratios within one run are the point; absolute times on shared machines are noisy.
"""

import argparse

import torch

from common import timed  # benchmarks/common.py (the script folder is on sys.path)
from metaembed.index import MetaEmbedIndex


def copy_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes per second of a large device-to-device copy (reads plus writes, as the floor's reads compare to)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), repeats, reduce=min)
    return 2 * source.numel() / seconds


def peer_scorers() -> dict:
    """name -> fn(queries [Q, r_q, D], candidates [N, r_c, D]) -> scores [Q, N], for those installed."""
    scorers = {"naive einsum": lambda q, c: torch.einsum("qid,njd->qnij", q, c).amax(-1).sum(-1)}
    try:
        from sentence_transformers.util import maxsim as st_maxsim

        scorers["sentence-transformers maxsim"] = lambda q, c: st_maxsim(q, c)
    except ImportError:
        pass
    try:
        from pylate.scores import colbert_scores

        scorers["PyLate colbert_scores"] = lambda q, c: colbert_scores(q, c)
    except ImportError:
        pass
    try:
        from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

        scorers["colpali-engine score_multi_vector"] = lambda q, c: BaseVisualRetrieverProcessor.score_multi_vector(
            list(q), list(c), device=q.device
        )
    except ImportError:
        pass
    return scorers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 1, 2, 4, 4, 8, 8, 16, 16, 64])
    parser.add_argument("--batch", type=int, default=32, help="queries per batch for the batched per-query time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-budgets", type=int, nargs="+", default=[1, 1, 16, 64], help="budgets the peers run")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    budgets = list(zip(args.budgets[::2], args.budgets[1::2]))
    r_q_max, r_c_max = max(b[0] for b in budgets), max(b[1] for b in budgets)
    torch.manual_seed(0)

    embeddings = torch.nn.functional.normalize(torch.randn(args.num_items, r_c_max, args.dim), dim=-1).to(torch.bfloat16)
    index = MetaEmbedIndex(args.dim, r_c_max, device=device)
    index.add(embeddings)
    queries = torch.nn.functional.normalize(torch.randn(args.batch, r_q_max, args.dim), dim=-1).to(torch.bfloat16)
    queries = queries.to(device)
    bandwidth = copy_bandwidth(device)
    print(f"{device}: copy bandwidth {bandwidth / 1e9:.1f} GB/s; N = {args.num_items:,}, D = {args.dim}, bf16; "
          f"batch of {args.batch} queries")  # fmt: skip
    print()
    print("| budget | bytes per scan | floor ms | single query ms | x floor | batched ms/query | x floor | GB/s single |")
    print("|---|---|---|---|---|---|---|---|")
    for r_q, r_c in budgets:
        nbytes = args.num_items * r_c * args.dim * 2
        floor = nbytes / bandwidth
        single = timed(lambda: index.search(queries[:1], budget=(r_q, r_c), k=10), args.repeats, reduce=min)
        batch = lambda: index.search(queries, budget=(r_q, r_c), k=10, query_batch_size=args.batch)  # noqa: E731
        batched = timed(batch, args.repeats, reduce=min) / args.batch
        print(f"| ({r_q}, {r_c}) | {nbytes:,} | {floor * 1e3:.2f} | {single * 1e3:.2f} | {single / floor:.2f} | "
              f"{batched * 1e3:.2f} | {batched / floor:.2f} | {nbytes / single / 1e9:.1f} |")  # fmt: skip

    print()
    print("Single query, the same bf16 embeddings: time as a ratio to MetaEmbedIndex.search")
    print("| budget | scorer | ms | x ours |")
    print("|---|---|---|---|")
    item_major = embeddings.to(device)
    for r_q, r_c in zip(args.peer_budgets[::2], args.peer_budgets[1::2]):
        ours = timed(lambda: index.search(queries[:1], budget=(r_q, r_c), k=10), args.repeats, reduce=min)
        print(f"| ({r_q}, {r_c}) | MetaEmbedIndex.search | {ours * 1e3:.2f} | 1.00 |")
        q, c = queries[:1, :r_q], item_major[:, :r_c]
        for name, scorer in peer_scorers().items():
            seconds = timed(lambda: scorer(q, c).topk(10, dim=-1), max(1, args.repeats // 2), reduce=min)
            print(f"| ({r_q}, {r_c}) | {name} | {seconds * 1e3:.2f} | {seconds / ours:.2f} |")


if __name__ == "__main__":
    main()
