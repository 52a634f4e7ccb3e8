"""MetaEmbedIndex scoring speed against the machine's floor and against other scorers, in one run.

    python benchmarks/index_scoring.py                       # CPU: N = 20,000, D = 1,024, bf16 storage
    python benchmarks/index_scoring.py --kernel avx2         # force the AVX2 kernel (or amx, torch)
    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/index_scoring.py --as-avx2-cpu
                                                             # an AMX CPU run as an AVX2-only one (floors included)
    python benchmarks/index_scoring.py --device cuda --num-items 100000 --dim 3584   # the paper's 7B shape, GPU

The floor of one search is the larger of two times measured here, in this run: its bytes (N * r_c * D * 2 for bf16
storage) at the memory read bandwidth (a read-only pass over a buffer far larger than the caches), and its FLOPs
(2 * Q * N * r_q * r_c * D) at the float32 GEMM peak (a large square torch.mm). The run goes in --repeats rounds:
each measures both floors and times every search once from cold caches (a large buffer is read before each), and
every number keeps its best over the rounds (for the floors, the stricter floor). For each budget: the kernel that ran (`metaembed.retrieval.scan_kernel`),
one query, and --batch queries in one call (time per query), each as a ratio to its floor, with a check that the
top-10 ids equal a float32 reference (float32 queries against the stored bf16 vectors widened to float32); "avx2 /
torch" in the kernel column means one query ran the first, the batch the second. Then the peers on the same bf16
embeddings (item-major [N, R_c, D], as they take them, with bf16 queries), one timed run each:
sentence-transformers `maxsim`, PyLate `colbert_scores` and a naive einsum, as ratios to the same floor.
The CPU, its vector extensions, torch's CPU capability and the load average before and after are printed.
"""

import argparse
import os
import platform
import time

import torch

from metaembed.retrieval import scan_kernel
from metaembed.retrieval.index import MetaEmbedIndex


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            lines = info.read().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1] for line in lines if line.startswith("flags")).split())
        isa = ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model\t")), "?")
        capability = torch.backends.cpu.get_cpu_capability()
        mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "all")
        usable = scan_kernel.features() if platform.machine() in ("x86_64", "AMD64") else {}
        kernels = ", ".join(kind for kind, ok in usable.items() if ok) or "none"
        return (
            f"{name} (family 6 model {model}; {torch.get_num_threads()} threads; {isa}; torch CPU capability "
            f"{capability}, MKL instructions {mkl}; kernels usable: {kernels})"
        )
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device: torch.device, flush=None, warm_up: bool = True) -> float:
    """Best-of-`repeats` seconds of fn(), after one warm-up, each run from cold caches when `flush` is given."""
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(repeats):
        if flush is not None:
            flush()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes per second of the fastest read-only pass (sum, max) over a buffer far larger than the caches."""
    buffer = torch.ones(megabytes * 2**20 // 4, device=device)
    seconds = min(best_time(lambda: buffer.sum(), repeats, device), best_time(lambda: buffer.amax(), repeats, device))
    return buffer.numel() * 4 / seconds


def gemm_peak(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """float32 FLOP/s of a large square matrix product."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    return 2 * size**3 / best_time(lambda: torch.mm(a, b, out=out), repeats, device)


def agreement(positions: torch.Tensor, reference: torch.Tensor, tolerance: float = 1e-5) -> str:
    """ "yes" when each query's top ids are the reference's top ids (as sets), "ties" when they differ only by items
    whose reference scores are within `tolerance` of the reference's k-th score, "NO" otherwise."""
    k = positions.shape[1]
    verdict = "yes"
    for found, scores in zip(positions.cpu(), reference):
        top = scores.topk(k)
        expected = set(top.indices.tolist())
        if set(found.tolist()) == expected:
            continue
        kth = top.values[-1].item()
        differing = set(found.tolist()) ^ expected
        if all(abs(scores[i].item() - kth) <= tolerance for i in differing):
            verdict = "ties"
        else:
            return "NO"
    return verdict


def peer_scorers() -> dict:
    """name -> fn(queries [Q, r_q, D], candidates [N, r_c, D]) -> scores [Q, N]; a string where not installed."""
    scorers = {"naive einsum": lambda q, c: torch.einsum("qid,njd->qnij", q, c).amax(-1).sum(-1)}
    try:
        from sentence_transformers.util import maxsim as st_maxsim

        scorers["sentence-transformers maxsim"] = lambda q, c: st_maxsim(q, c)
    except ImportError as error:
        scorers["sentence-transformers maxsim"] = f"not installed ({error})"
    try:
        from pylate.scores import colbert_scores

        scorers["PyLate colbert_scores"] = lambda q, c: colbert_scores(q, c)
    except ImportError:
        scorers["PyLate colbert_scores"] = (
            "not installed: pylate 1.6 pins sentence-transformers==5.3.0 and "
            "transformers<=5.3.0 (this project needs >=6.2 / >=5.23); its pure-torch "
            "scores module runs from `pip install --no-deps --target DIR pylate` on "
            "PYTHONPATH"
        )
    return scorers


def peers(args, index, queries, floor, kernel_for, device, flush, singles) -> None:
    """The single-query table: ours (its best over the rounds where the rounds timed that budget, else timed
    here), then each peer on the same bf16 embeddings, as ratios to the floor."""
    print()
    print(
        "Single query, the same bf16 embeddings (item-major, bf16 queries for the peers, one timed run each; ours: "
        "its best over the rounds, as above): ratio "
        "to the floor"
    )
    print("| budget | scorer | ms | x floor |")
    print("|---|---|---|---|")
    item_major = index.vectors.transpose(0, 1).contiguous()  # [N, R_c, D] bf16, as the peers take it
    scorers = peer_scorers()
    for r_q, r_c in zip(args.peer_budgets[::2], args.peer_budgets[1::2]):
        f1 = floor(r_q, r_c, 1)
        ours = singles.get((r_q, r_c)) or best_time(
            lambda: index.search(queries[:1], budget=(r_q, r_c), k=10), args.repeats, device, flush
        )
        print(
            f"| ({r_q}, {r_c}) | MetaEmbedIndex.search (float32 query, {kernel_for(r_c, r_q)}) | {ours * 1e3:.2f} | "
            f"{ours / f1:.2f} |"
        )
        q, c = queries[:1, :r_q].to(torch.bfloat16), item_major[:, :r_c]
        for name, scorer in scorers.items():
            if isinstance(scorer, str):
                print(f"| ({r_q}, {r_c}) | {name} | {scorer} | - |")
                continue
            seconds = best_time(lambda: scorer(q, c).topk(10, dim=-1), 1, device, flush, warm_up=False)
            print(f"| ({r_q}, {r_c}) | {name} | {seconds * 1e3:.2f} | {seconds / f1:.2f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 1, 2, 4, 4, 8, 8, 16, 16, 64])
    parser.add_argument("--batch", type=int, default=32, help="queries per batch for the batched per-query time")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (floors and every search once each)")
    parser.add_argument(
        "--peer-budgets",
        type=int,
        nargs="*",
        default=[1, 1, 4, 8, 16, 64],
        help="budgets the peers run (none: no peer table)",
    )
    parser.add_argument("--flush-mb", type=int, default=1024, help="buffer read between timed runs (cold caches)")
    parser.add_argument("--bandwidth-mb", type=int, default=1024, help="buffer the read bandwidth is measured on")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for everything (floors included)")
    parser.add_argument(
        "--kernel",
        choices=scan_kernel.CHOICES,
        default=None,
        help=f"set {scan_kernel.ENVIRONMENT} (default: as the environment says, else auto)",
    )
    parser.add_argument(
        "--as-avx2-cpu",
        action="store_true",
        help="choose kernels as a CPU without AMX would (set MKL_ENABLE_INSTRUCTIONS=AVX2 and "
        "ATEN_CPU_CAPABILITY=avx2 too, so that torch, MKL and the floors use AVX2 alone)",
    )
    args = parser.parse_args(argv)
    if args.as_avx2_cpu and scan_kernel.compiled() is not None:
        scan_kernel._state["features"]["amx"] = False  # what cpu_features() reports on an AVX2-only CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernel:
        os.environ[scan_kernel.ENVIRONMENT] = args.kernel
    device = torch.device(args.device)
    budgets = list(zip(args.budgets[::2], args.budgets[1::2]))
    r_q_max, r_c_max = max(b[0] for b in budgets), max(b[1] for b in budgets)
    torch.manual_seed(0)

    index = MetaEmbedIndex(args.dim, r_c_max, device=device)
    for start in range(0, args.num_items, 2048):  # built in pieces: no float32 copy of the whole index
        n = min(2048, args.num_items - start)
        index.add(torch.nn.functional.normalize(torch.randn(n, r_c_max, args.dim), dim=-1))
    queries = torch.nn.functional.normalize(torch.randn(args.batch, r_q_max, args.dim), dim=-1).to(device)
    flush_buffer = torch.ones(args.flush_mb * 2**20 // 4, device=device) if args.flush_mb else None
    flush = (lambda: flush_buffer.sum()) if flush_buffer is not None else None
    load_before = os.getloadavg()
    where = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{where}")
    print(
        f"N = {args.num_items:,}, D = {args.dim}, bf16 storage, float32 queries; batch of {args.batch}; "
        f"load average {load_before[0]:.2f}"
    )

    def floor(r_q, r_c, q):
        nbytes = args.num_items * r_c * args.dim * 2
        return max(nbytes / bandwidth, 2 * q * args.num_items * r_q * r_c * args.dim / peak)

    def kernel_for(r_c, rows=1):
        return scan_kernel.choose(index.vectors, r_c, rows=rows) if device.type == "cpu" else device.type

    # Rounds: each measures the floors and runs every search once, each from cold caches; every number keeps its
    # best over the rounds. A shared host's speed moves in windows of seconds (on the Xeon of docs/retrieval.md
    # one AMX search took 18 ms and 40 ms a few seconds apart, in one process), so the samples of each search and
    # of the floors are spread over the whole run rather than taken back to back in one window.
    bandwidths, peaks, singles, batches = [], [], {}, {}
    for round_number in range(args.repeats):
        bandwidths.append(read_bandwidth(device, args.bandwidth_mb, repeats=2))
        peaks.append(gemm_peak(device, repeats=2))
        for r_q, r_c in budgets:
            warm_up = round_number == 0  # the first call of each shape builds what later calls reuse
            single = best_time(lambda: index.search(queries[:1], budget=(r_q, r_c), k=10), 1, device, flush, warm_up)
            batch = lambda: index.search(queries, budget=(r_q, r_c), k=10, query_batch_size=args.batch)  # noqa: E731
            batched = best_time(batch, 1, device, flush, warm_up) / args.batch
            singles[(r_q, r_c)] = min(singles.get((r_q, r_c), float("inf")), single)
            batches[(r_q, r_c)] = min(batches.get((r_q, r_c), float("inf")), batched)
    bandwidth, peak = max(bandwidths), max(peaks)
    print(
        f"floors, the best of {args.repeats} rounds interleaved with the searches: read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (rounds {min(bandwidths) / 1e9:.1f}-{bandwidth / 1e9:.1f}), float32 GEMM peak "
        f"{peak / 1e9:.0f} GFLOP/s (rounds {min(peaks) / 1e9:.0f}-{peak / 1e9:.0f})"
    )

    timings = []  # (budget, kernel, single seconds, batched seconds per query, exact)
    vectors = index.vectors  # [R_c, N, D] bf16
    for r_q, r_c in budgets:
        # Exactness: the top-10 of 4 queries against a float32 reference built independently (einsum per tier).
        checked = queries[:4, :r_q]
        reference = torch.stack([torch.einsum("qid,nd->qin", checked, vectors[j].float()) for j in range(r_c)])
        reference = reference.amax(0).sum(1).cpu()  # [4, N]
        same = "yes"
        for found in (index.search(checked, budget=(r_q, r_c), k=10), index.search(queries, budget=(r_q, r_c), k=10)):
            same = min(same, agreement(found.positions[:4], reference), key=["NO", "ties", "yes"].index)
        del reference
        kernels = {kernel_for(r_c, r_q), kernel_for(r_c, args.batch * r_q)}  # single, batched
        kernel = " / ".join(sorted(kernels, key=[kernel_for(r_c, r_q), kernel_for(r_c, args.batch * r_q)].index))
        timings.append(((r_q, r_c), kernel, singles[(r_q, r_c)], batches[(r_q, r_c)], same))

    print()
    print(
        "| budget | kernel | bytes per scan | floor ms (1 query) | single query ms | x floor "
        "| floor ms/query (batched) | batched ms/query | x floor | top-10 ids = fp32 reference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (r_q, r_c), kernel, single, batched, same in timings:
        f1, fb = floor(r_q, r_c, 1), floor(r_q, r_c, args.batch) / args.batch
        print(
            f"| ({r_q}, {r_c}) | {kernel} | {args.num_items * r_c * args.dim * 2:,} | {f1 * 1e3:.2f} | "
            f"{single * 1e3:.2f} | {single / f1:.2f} | {fb * 1e3:.2f} | {batched * 1e3:.2f} | {batched / fb:.2f} | "
            f"{same} |"
        )

    if args.peer_budgets:
        peers(args, index, queries, floor, kernel_for, device, flush, singles)
    load_after = os.getloadavg()
    print()
    print(
        f"load average (1, 5, 15 min): before {', '.join(f'{v:.2f}' for v in load_before)}; after "
        f"{', '.join(f'{v:.2f}' for v in load_after)} ({os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
