"""What thinking costs: Think-Then-Embed query encoding (generate a trace, then embed query + trace) against plain
query encoding, on the same model and queries, measured in one run.

The unified model reasons with its own backbone (`model.as_reasoner()`), so both paths run the same weights; the
trace is forced to exactly T new tokens (min_new_tokens = max_new_tokens) so that the cost of T is what is
measured. Prints per-query times and their ratios to plain encoding.

    python benchmarks/reasoning_cost.py                       # CPU, a random Qwen3-shaped backbone
    python benchmarks/reasoning_cost.py --hidden-size 1024 --layers 12 --device cuda --trace-tokens 64 128 256
"""

import argparse

from common import sized_model, timed  # benchmarks/common.py (the script folder is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--trace-tokens", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = sized_model(args.hidden_size, args.layers, args.device, keep_lm_head=True).eval()
    queries = [
        f"find the quarterly report page where revenue of product line {i} fell while costs rose"
        for i in range(args.queries)
    ]
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"random qwen3, {parameters:.1f}M parameters (hidden {args.hidden_size}, {args.layers} layers), device "
        f"{args.device}; {args.queries} queries of ~{len(queries[0])} characters, batch {args.batch_size}; "
        f"median of {args.repeats}"
    )

    def plain():
        model.encode(queries, role="query", batch_size=args.batch_size, show_progress_bar=False)

    base = timed(plain, args.repeats) / args.queries
    print("\n| path | trace tokens | generate ms/query | embed ms/query | total ms/query | x plain |")
    print("|---|---|---|---|---|---|")
    print(f"| plain encode | 0 | 0.0 | {base * 1e3:.1f} | {base * 1e3:.1f} | 1.00 |")
    for tokens in args.trace_tokens:
        reasoner = model.as_reasoner(max_new_tokens=tokens, min_new_tokens=tokens, batch_size=args.batch_size)
        items = [{"text": q, "image": None} for q in queries]
        traces = reasoner(items)
        generate = timed(lambda: reasoner(items), args.repeats) / args.queries

        def embed():
            model.encode(queries, role="query", traces=traces, batch_size=args.batch_size, show_progress_bar=False)

        embed_s = timed(embed, args.repeats) / args.queries
        total = generate + embed_s
        print(
            f"| think, then embed | {tokens} | {generate * 1e3:.1f} | {embed_s * 1e3:.1f} | {total * 1e3:.1f} | "
            f"{total / base:.2f} |"
        )


if __name__ == "__main__":
    main()
