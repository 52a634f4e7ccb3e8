"""The compiled CPU MaxSim kernels (`metaembed.scan_kernel`): each one this CPU can run, forced through
METAEMBED_CPU_KERNEL, returns the top-k of the pure-torch scan (same ids, float32-close scores) at every budget and
awkward size; the AMX query split is exact to float32; the two-part certificate holds on every CPU (on the portable
reference scan, and on the tiles where the CPU has them); the kernel builds wherever it can run (two processes at
once, no system ninja, a compiler without AMX) and nowhere else; and when it cannot be built the search falls back to
the torch scan with a warning and the same results."""

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from metaembed.retrieval import scan_kernel
from metaembed.retrieval.index import MetaEmbedIndex

ROOT = Path(__file__).resolve().parents[1]
needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="no C++ compiler: the kernel cannot be built here",
)


def cpu_flags() -> set:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def kernels() -> list:
    """The kernels this machine runs (the AVX2 one also runs on AVX-512 / AMX CPUs, so it is tested there too). Where
    the kernel can be built (x86-64 Linux, a compiler), a kernel that did not build, or that misses an instruction set
    the CPU has, fails the test; elsewhere the test skips, saying why."""
    unsupported = scan_kernel.supported_platform()
    if unsupported is not None:
        pytest.skip(unsupported)
    if scan_kernel.compiled() is None:
        pytest.fail("g++ is installed but the scan kernel did not build (see the warning)")
    usable = scan_kernel.features()
    flags = cpu_flags()
    assert usable["avx2"] == ({"avx2", "fma"} <= flags), (usable, "the CPU's avx2 / fma flags")
    if {"amx_tile", "amx_bf16"} <= flags and os.environ.get(scan_kernel.AMX_BUILD_ENVIRONMENT, "1") != "0":
        assert usable["amx"], "this CPU has AMX tiles, but the kernel does not use them"
    return [kind for kind, available in usable.items() if available]


def random_index(count: int, num_vectors: int, dim: int, seed: int = 0) -> MetaEmbedIndex:
    generator = torch.Generator().manual_seed(seed)
    index = MetaEmbedIndex(dim, num_vectors)
    index.add(torch.nn.functional.normalize(torch.randn(count, num_vectors, dim, generator=generator), dim=-1))
    return index


def search_with(monkeypatch, kind: str, index, queries, budget, k, **kwargs):
    monkeypatch.setenv(scan_kernel.ENVIRONMENT, kind)
    assert scan_kernel.choose(index.codes, budget[1]) == kind
    return index.search(queries, budget=budget, k=k, **kwargs)


def assert_same_top(found, expected) -> None:
    """Same ids per query, each with a float32-close score, in descending order (items whose scores differ by float32
    rounding alone may come in either order)."""
    order, expected_order = found.positions.sort(dim=1), expected.positions.sort(dim=1)
    assert torch.equal(order.values, expected_order.values)
    torch.testing.assert_close(
        found.scores.gather(1, order.indices), expected.scores.gather(1, expected_order.indices), rtol=1e-5, atol=1e-5
    )
    assert torch.all(found.scores[:, 1:] <= found.scores[:, :-1])


@needs_compiler
@pytest.mark.parametrize("count, dim", [(301, 64), (1000, 96), (97, 1024)])
@pytest.mark.parametrize("budget", [(1, 1), (3, 2), (4, 8), (16, 8)])
def test_kernels_return_the_torch_scans_top_k(monkeypatch, count, dim, budget):
    index = random_index(count, 8, dim)
    queries = torch.randn(5, 16, dim, generator=torch.Generator().manual_seed(1))
    for kind in kernels():
        for k in (1, 10, count):
            expected = search_with(monkeypatch, "torch", index, queries, budget, k)
            found = search_with(monkeypatch, kind, index, queries, budget, k)
            assert_same_top(found, expected)


@needs_compiler
def test_kernels_in_several_passes_and_query_batches(monkeypatch):
    index = random_index(500, 4, 64)
    queries = torch.randn(37, 4, 64, generator=torch.Generator().manual_seed(2))
    expected = search_with(monkeypatch, "torch", index, queries, (4, 4), 10)
    monkeypatch.setattr(scan_kernel, "AMX_PART_BYTES_PER_PASS", 1)  # one query per pass
    monkeypatch.setattr(scan_kernel, "AVX2_ROW_BYTES_PER_PASS", 3 * 4 * 4 * 64)  # three queries per pass
    for kind in kernels():
        assert_same_top(search_with(monkeypatch, kind, index, queries, (4, 4), 10, query_batch_size=5), expected)


@needs_compiler
def test_kernels_on_a_memory_mapped_index_and_in_two_stage_search(monkeypatch, tmp_path):
    random_index(700, 8, 128).save(tmp_path / "index")
    index = MetaEmbedIndex.load(tmp_path / "index", mmap=True)
    queries = torch.randn(3, 8, 128, generator=torch.Generator().manual_seed(3))
    expected = search_with(monkeypatch, "torch", index, queries, (8, 8), 10)
    two_stage = index.search_two_stage(queries, (8, 8), k=10, shortlist=50)
    for kind in kernels():
        assert_same_top(search_with(monkeypatch, kind, index, queries, (8, 8), 10), expected)
        assert torch.equal(index.search_two_stage(queries, (8, 8), k=10, shortlist=50).positions, two_stage.positions)


@needs_compiler
def test_amx_query_parts_add_up_to_the_float32_queries():
    queries = torch.randn(3, 5, 64) * torch.logspace(-3, 3, 64)
    parts = scan_kernel.amx_query_parts(queries)  # [blocks, D / 32, 16 pairs, 32 = 16 rows x 2]
    rows = 15
    virtual = parts.view(parts.shape[0], 2, 16, 16, 2).permute(0, 3, 1, 2, 4).reshape(-1, 64)[: 3 * rows].float()
    hi, mid, lo = virtual.view(3, rows, 64)
    total = (hi.double() + mid.double() + lo.double()).view(3, 5, 64)
    assert torch.all((total - queries.double()).abs() <= 2.0**-24 * queries.double().abs())
    assert torch.equal(hi, queries.reshape(rows, 64).bfloat16().float())


def two_part_scans() -> dict:
    """The two-part certified scans to test here: the portable reference scan on every CPU (scalar float32 sums of
    the same bf16 parts, the same certificate code), and the AMX kernel where the CPU has tiles."""
    module = scan_kernel.compiled() if "avx2" in kernels() else None
    if module is None:
        pytest.skip("the portable reference scan shares the kernels' AVX2 top-k lists: no AVX2 here")
    scans = {"reference": module.top_two_part_reference}
    if "amx" in kernels():
        scans["amx"] = module.top_amx
    return scans


@needs_compiler
@pytest.mark.parametrize("count, dim, r_c", [(20_000, 64, 1), (2000, 96, 4), (1200, 1024, 2)])
def test_two_part_scan_is_certified_to_equal_three_parts(count, dim, r_c):
    """Batches whose query rows need fewer AMX tiles with two bf16 parts per value than with three run with two,
    keep k + 8 candidates and re-score them with three parts: the same ids and bit-equal scores as the three-part
    scan of the same arithmetic, for vectors of several norms and queries of large norm, with equal items across
    rank k (one order of ties everywhere: the lower position first), and on a run of equal scores longer than the
    candidates kept (those queries are scanned again with three parts). Run on the reference scan on every CPU and on
    the tiles where there are some: only the tile arithmetic itself needs AMX."""
    generator = torch.Generator().manual_seed(4)
    vectors = torch.nn.functional.normalize(torch.randn(r_c, count, dim, generator=generator), dim=-1)
    vectors = (vectors * 3 * torch.rand(r_c, count, 1, generator=generator)).bfloat16()
    module = scan_kernel.compiled() if "avx2" in kernels() else None
    for name, top in two_part_scans().items():

        def same_as_three_parts(vectors, queries, k):
            max_norm = float(vectors.float().norm(dim=-1).max())
            exact_scores, exact_positions = top(vectors, r_c, count, queries, k, -1.0)  # three parts
            assert module.amx_uses_two_parts(queries.shape[0], queries.shape[1], k, count, max_norm)
            scores, positions = top(vectors, r_c, count, queries, k, max_norm)
            assert torch.equal(positions, exact_positions) and torch.equal(scores, exact_scores), name
            return positions

        cases = [(1, 32, 20), (2, 8, 20), (16, 2, 20)] if count >= 20_000 else [(2, 8, 1), (16, 2, 10), (16, 2, 20)]
        for r_q, num_queries, k in cases:
            same_as_three_parts(vectors, 100 * torch.randn(num_queries, r_q, dim, generator=generator), k)

        copies = vectors.clone()
        copies[:, 7] = (3.5 * torch.nn.functional.normalize(copies[:, 7].float(), dim=-1)).bfloat16()  # the largest
        copies[:, [100, 3, count - 1, count // 2]] = copies[:, 7:8].clone()  # five equal items, over the threads
        queries = copies[0, 7].float().expand(8, 1, dim).contiguous() if r_c == 1 else None
        if queries is not None:  # the five share the top score: the three lowest positions, whichever path
            assert same_as_three_parts(copies, queries, 3)[0].tolist() == [3, 7, 100]
            copies[0, 200:241] = copies[0, 7].clone()  # 46 equal items at the top: more than k + 8: scanned again
            same_as_three_parts(copies, queries, 10)


@needs_compiler
def test_reference_scan_is_float32_maxsim():
    """The portable reference scan (three parts) is MaxSim of the float32 queries to float32 rounding: the
    certificate tests on it test a scan of the kernel's arithmetic, not of another one."""
    module = scan_kernel.compiled() if two_part_scans() else None
    generator = torch.Generator().manual_seed(7)
    vectors = torch.nn.functional.normalize(torch.randn(3, 500, 64, generator=generator), dim=-1).bfloat16()
    queries = torch.randn(4, 2, 64, generator=generator)
    exact = torch.einsum("qrd,jnd->qrjn", queries.double(), vectors.double()).amax(dim=2).sum(dim=1).topk(10)
    scores, positions = module.top_two_part_reference(vectors, 3, 500, queries, 10, -1.0)
    assert torch.equal(positions.sort(dim=1).values, exact.indices.sort(dim=1).values)
    torch.testing.assert_close(scores.double(), exact.values, rtol=0, atol=1e-5)


@needs_compiler
def test_certificate_on_given_scores():
    """The certificate alone (`certify_top_k`, the code the AMX scan runs): the candidates' top-k by three-part
    score, the lower item first among equals, where its k-th score beats the K-th two-part score plus the bound
    (strictly); else the query is left to a three-part scan."""
    module = scan_kernel.compiled() if kernels() else None
    two_part = torch.tensor(
        [
            [1.0, 0.9, 0.5, 0.2],
            [1.0, 0.9, 0.85, 0.8],
            [1.0, 0.9, 0.85, 0.8],
            [0.7, 0.7, 0.6, 0.1],
            [1.0, 0.9, 0.85, 0.75],
        ]
    )
    candidates = torch.tensor(
        [[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33], [43, 42, 41, 40], [50, 51, 52, 53]]
    )
    three_part = torch.tensor(
        [
            [1.0, 0.91, 0.49, 0.21],
            [0.95, 0.84, 0.86, 0.80],
            [0.95, 0.80, 0.84, 0.81],
            [0.7, 0.7, 0.6, 0.1],
            [0.95, 0.875, 0.8, 0.7],
        ]
    )
    bounds = torch.tensor([0.1, 0.05, 0.05, 0.01, 0.125], dtype=torch.float64)
    scores, positions, uncertain = module.certify_top_k(two_part, candidates, three_part, bounds, 2)
    # 0: certified as scanned; 1: re-ordered by the three-part scores (0.86 > 0.80 + 0.05); 2: its 2nd best, 0.84,
    # does not beat 0.80 + 0.05, an item left out might; 3: a tie at the top, the lower item first; 4: its 2nd best,
    # 0.875 equals 0.75 + 0.125 (all exact in binary): not strictly above, uncertain.
    assert uncertain.tolist() == [False, False, True, False, True]
    assert positions[[0, 1, 3]].tolist() == [[10, 11], [20, 22], [42, 43]]
    torch.testing.assert_close(scores[[0, 1, 3]], torch.tensor([[1.0, 0.91], [0.95, 0.86], [0.7, 0.7]]))


def test_choice_of_kernel(monkeypatch):
    index = random_index(50, 2, 64)
    monkeypatch.setenv(scan_kernel.ENVIRONMENT, "auto")
    assert scan_kernel.choose(index.codes, 2) == "torch"  # too small to gain anything (and to compile for)
    monkeypatch.setenv(scan_kernel.ENVIRONMENT, "torch")
    assert scan_kernel.choose(torch.zeros(1, 10**6, 64, dtype=torch.bfloat16), 1) == "torch"
    monkeypatch.setenv(scan_kernel.ENVIRONMENT, "avx2")
    assert scan_kernel.choose(torch.zeros(1, 10, 64), 1) == "torch"  # float32 storage: the torch scan
    monkeypatch.setenv(scan_kernel.ENVIRONMENT, "fast")
    with pytest.raises(ValueError, match="METAEMBED_CPU_KERNEL"):
        scan_kernel.choose(index.codes, 2)


@pytest.mark.parametrize(
    "features, dim, wanted, chosen",
    [
        ({"avx2": True, "amx": True}, 1024, "auto", "amx"),  # Sapphire Rapids and later
        ({"avx2": True, "amx": True}, 48, "auto", "avx2"),  # AMX tiles take 32 dimensions at a time
        ({"avx2": True, "amx": False}, 1024, "auto", "avx2"),  # AVX2-only CPUs (Zen 3, Haswell ... Ice Lake)
        ({"avx2": True, "amx": False}, 1024, "amx", "avx2"),  # a forced kernel the CPU lacks: the next one
        ({"avx2": False, "amx": False}, 1024, "auto", "torch"),  # neither (or not x86-64)
        ({"avx2": True, "amx": True}, 40, "auto", "torch"),  # D not a multiple of 16
    ],
)
def test_kernel_chosen_by_what_the_cpu_reports(monkeypatch, features, dim, wanted, chosen):
    monkeypatch.setattr(scan_kernel, "_state", {"module": object(), "features": features})  # as cpu_features() says
    monkeypatch.setenv(scan_kernel.ENVIRONMENT, wanted)
    vectors = torch.empty(1, 1, dim, dtype=torch.bfloat16)
    assert scan_kernel.choose(vectors, 1, num_values=scan_kernel.KERNEL_FROM_BYTES) == chosen
    # Many query rows per pass: AVX2-only CPUs leave compute-bound batches to the torch scan (MKL), unless forced.
    many = scan_kernel.choose(vectors, 1, num_values=scan_kernel.KERNEL_FROM_BYTES, rows=512)
    assert many == ("torch" if chosen == "avx2" and wanted == "auto" else chosen)


@needs_compiler
def test_non_finite_queries_and_large_k_use_the_torch_scan(monkeypatch):
    index = random_index(400, 2, 64)
    for kind in kernels():
        monkeypatch.setenv(scan_kernel.ENVIRONMENT, kind)
        queries = torch.randn(2, 2, 64)
        queries[1, 0, 3] = float("nan")
        assert index._tail.kernel_top(queries, 2, 10, 64, 2**26) is None
        assert index._tail.kernel_top(queries[:1], 2, 400, 64, 2**15) is None  # its top-k lists would not fit
        found = index.search(queries[:1], (2, 2), k=400, max_work_bytes=2**17)
        monkeypatch.setenv(scan_kernel.ENVIRONMENT, "torch")
        assert_same_top(found, index.search(queries[:1], (2, 2), k=400, max_work_bytes=2**17))


def test_a_kernel_that_cannot_be_built_falls_back_to_the_torch_scan(monkeypatch, tmp_path):
    index = random_index(300, 4, 64)
    queries = torch.randn(2, 4, 64)
    monkeypatch.setenv(scan_kernel.ENVIRONMENT, "torch")
    expected = index.search(queries, (4, 4), k=10)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(scan_kernel, "_state", {})
    monkeypatch.setenv(scan_kernel.KERNEL_DIR_ENVIRONMENT, str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setenv(scan_kernel.ENVIRONMENT, "amx")
    with pytest.warns(UserWarning, match="pure-torch scan"):
        assert scan_kernel.choose(index.codes, 4) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every search
        assert_same_top(index.search(queries, (4, 4), k=10), expected)
    assert scan_kernel.features() == {"avx2": False, "amx": False}


@pytest.mark.parametrize("system, machine", [("darwin", "arm64"), ("linux", "aarch64"), ("win32", "AMD64")])
def test_a_platform_without_a_kernel_takes_the_torch_scan_without_compiling(monkeypatch, caplog, system, machine):
    index = random_index(300, 4, 64)
    queries = torch.randn(2, 4, 64)
    monkeypatch.setenv(scan_kernel.ENVIRONMENT, "torch")
    expected = index.search(queries, (4, 4), k=10)

    def compile_anyway(*args, **kwargs):
        raise AssertionError("no compile may start on a platform without a kernel")

    monkeypatch.setattr(scan_kernel, "_state", {})
    monkeypatch.setattr(scan_kernel.sys, "platform", system)
    monkeypatch.setattr(scan_kernel.platform, "machine", lambda: machine)
    monkeypatch.setattr(scan_kernel, "_load_or_build", compile_anyway)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", compile_anyway)
    monkeypatch.setenv(scan_kernel.ENVIRONMENT, "auto")
    with caplog.at_level(logging.WARNING, logger=scan_kernel.__name__), warnings.catch_warnings():
        warnings.simplefilter("error")  # a log line that says why, not a warning at every search
        assert scan_kernel.choose(torch.zeros(1, 10**6, 64, dtype=torch.bfloat16), 1) == "torch"
        assert_same_top(index.search(queries, (4, 4), k=10), expected)
        assert scan_kernel.compiled() is None
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 1 and "x86-64 Linux" in said[0] and machine in said[0], said
    assert scan_kernel.features() == {"avx2": False, "amx": False}


BUILD_AND_SEARCH = """
import json, logging, sys, torch
from metaembed.retrieval import scan_kernel
torch.set_num_threads(1)
module = scan_kernel.compiled()
vectors = torch.nn.functional.normalize(torch.randn(2, 500, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
queries = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(1))
scores, positions = module.top_avx2(vectors.bfloat16(), 2, 500, queries, 1, 10)
exact = torch.einsum("qrd,jnd->qrjn", queries.double(), vectors.bfloat16().double()).amax(2).sum(1).topk(10)
print(json.dumps({"features": scan_kernel.features(), "positions": sorted(positions[0].tolist()),
                  "expected": sorted(exact.indices[0].tolist()),
                  "error": (scores.double() - exact.values).abs().max().item()}))
"""


@needs_compiler
def test_two_processes_build_the_kernel_at_once_without_system_ninja_or_amx(tmp_path):
    """A fresh machine as users have it: the venv's python run without activating the venv (as ./run does), no ninja
    on PATH, a compiler whose AMX code is off (as GCC 9 / 10 would build it: METAEMBED_KERNEL_AMX=0), and two
    processes that need the kernel at the same moment. Both end with a working AVX2 kernel, built once."""
    if scan_kernel.supported_platform() is not None:
        pytest.skip(scan_kernel.supported_platform())
    if "avx2" not in kernels():
        pytest.skip("no AVX2 here: the module builds, but no kernel of it runs")
    tools = tmp_path / "bin"  # every program on PATH but ninja
    tools.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        for program in Path(folder).glob("*") if Path(folder).is_dir() else []:
            if program.name != "ninja" and not (tools / program.name).exists():
                (tools / program.name).symlink_to(program)
    assert shutil.which("ninja", path=str(tools)) is None and shutil.which("c++", path=str(tools))
    env = {
        **os.environ,
        "PATH": str(tools),
        scan_kernel.KERNEL_DIR_ENVIRONMENT: str(tmp_path / "kernels"),
        scan_kernel.AMX_BUILD_ENVIRONMENT: "0",
        "PYTHONPATH": str(ROOT),
    }
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_AND_SEARCH], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=900) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
        found = json.loads(out)
        assert found["features"] == {"avx2": True, "amx": False}, found
        assert found["positions"] == found["expected"] and found["error"] < 1e-5, found
    announced = sum(err.count("compiling the CPU MaxSim kernel") for _, err in outputs)
    assert announced == 1, [err[-2000:] for _, err in outputs]  # one build, announced once; the other waited
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 1


@needs_compiler
@pytest.mark.parametrize("library", [0, 1])  # MKL's sgemm with packed queries where torch has it; ATen's mm
@pytest.mark.parametrize("count, dim", [(301, 64), (97, 1024)])
@pytest.mark.parametrize("budget", [(1, 1), (3, 2), (4, 8), (16, 8)])
def test_avx2_gemm_path_returns_the_torch_scans_top_k(monkeypatch, library, count, dim, budget):
    """The AVX2 kernel's path for many query rows (blocks widened to float32 in L2, a float32 GEMM), forced for
    every batch, with blocks that leave a partial one at the end."""
    if "avx2" not in kernels():
        pytest.skip("no AVX2 here")
    index = random_index(count, 8, dim)
    queries = torch.randn(5, 16, dim, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(scan_kernel, "AVX2_GEMM_FROM_ROWS", 1)
    monkeypatch.setattr(scan_kernel, "AVX2_GEMM_BLOCK_VECTORS", 40)
    monkeypatch.setattr(scan_kernel, "_GEMM_LIBRARY", library)
    if library == 0 and torch.backends.mkl.is_available():  # else this case would test ATen's mm twice
        assert scan_kernel.compiled().gemm_library() == [True, True], "torch has MKL, but the kernel did not find it"
    for k in (1, 10, count):
        expected = search_with(monkeypatch, "torch", index, queries, budget, k)
        assert_same_top(search_with(monkeypatch, "avx2", index, queries, budget, k), expected)
