"""Every benchmark script runs end to end in a CI-sized configuration and prints its table of measured ratios.

These check that the scripts work, not their numbers (timings on shared CI machines are noise): the numbers in
docs/ (listed in docs/benchmarks.md) come from the full-size commands written next to them."""

import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RATIO = re.compile(r"\d+\.\d+")


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_index_scoring():
    out = run(
        "index_scoring.py",
        "--num-items",
        "300",
        "--dim",
        "16",
        "--budgets",
        "1",
        "1",
        "2",
        "4",
        "--peer-budgets",
        "2",
        "4",
        "--repeats",
        "1",
        "--batch",
        "4",
        "--flush-mb",
        "8",
        "--bandwidth-mb",
        "64",
    )
    assert "read bandwidth" in out and "GEMM peak" in out
    assert re.search(r"\| \(2, 4\) \| torch \| [\d,]+ \|.* \| yes \|", out)  # top-10 equal to the fp32 reference
    assert re.search(r"\| \(2, 4\) \| naive einsum \| [\d.]+ \| [\d.]+ \|", out)
    # The compiled kernel forced on the same small run (AVX2 runs on every x86-64 CPU this package targets).
    out = run(
        "index_scoring.py",
        "--num-items",
        "300",
        "--dim",
        "32",
        "--budgets",
        "2",
        "4",
        "--peer-budgets",
        "2",
        "4",
        "--repeats",
        "1",
        "--batch",
        "4",
        "--flush-mb",
        "8",
        "--bandwidth-mb",
        "64",
        "--kernel",
        "avx2",
    )
    if platform.machine() in ("x86_64", "AMD64") and shutil.which("c++"):
        assert re.search(r"\| \(2, 4\) \| avx2 \| [\d,]+ \|.* \| yes \|", out)


def test_two_stage_recall(tiny_checkpoint):
    out = run(
        "two_stage_recall.py",
        "--checkpoint",
        str(tiny_checkpoint("qwen2_5_vl")),
        "--limit",
        "40",
        "--shortlists",
        "10",
        "20",
        "--budgets",
        "2",
        "4",
        "--k",
        "5",
    )
    row = next(line for line in out.splitlines() if line.startswith("| (2, 4)"))
    recalls = [float(v) for v in re.findall(r"(\d\.\d{3}) \(reads", row)]
    assert len(recalls) == 2 and all(0.0 <= r <= 1.0 for r in recalls)


def test_encode_overhead():
    out = run(
        "encode_overhead.py",
        "--text-tokens",
        "16",
        "--batch-size",
        "2",
        "--hidden-size",
        "64",
        "--layers",
        "1",
        "--repeats",
        "1",
    )
    assert "measured ratio" in out and len(RATIO.findall(out)) >= 4


def test_mmr_loss_cost():
    out = run("mmr_loss_cost.py", "--batch-size", "4", "--hidden-size", "64", "--layers", "1", "--repeats", "1")
    assert "ratio MMR / single group" in out


def test_similarity_memory():
    out = run("similarity_memory.py", "--batches", "8", "--dim", "16", "--block-mb", "1")
    assert "direct / ours" in out and re.search(r"\d+(\.\d+)?x", out)


def test_reasoning_cost():
    out = run(
        "reasoning_cost.py",
        "--queries",
        "2",
        "--batch-size",
        "2",
        "--trace-tokens",
        "4",
        "--hidden-size",
        "64",
        "--layers",
        "1",
        "--repeats",
        "1",
    )
    row = next(line for line in out.splitlines() if line.startswith("| think, then embed | 4 |"))
    assert float(row.split("|")[-2]) > 0


def test_compressed_recall(tiny_checkpoint):
    out = run(
        "compressed_recall.py",
        "--checkpoint",
        str(tiny_checkpoint("qwen2_5_vl")),
        "--limit",
        "40",
        "--shortlists",
        "10",
        "20",
        "--budgets",
        "1",
        "1",
        "2",
        "4",
        "--k",
        "5",
    )
    rows = [line for line in out.splitlines() if line.startswith(("| (2, 4) | int8", "| (2, 4) | binary"))]
    assert len(rows) == 2
    for row in rows:
        recalls = [float(v) for v in re.findall(r"\| (\d\.\d{3})", row)]
        assert len(recalls) == 3 and all(0.0 <= r <= 1.0 for r in recalls)


def test_load_test():
    out = run("load_test.py", "--items", "1500", "--queries", "12", "--dim", "32", "--shortlist", "50", "--batch", "8")
    rows = [line for line in out.splitlines() if line.startswith("| MetaEmbedIndex") or line.startswith("| Qdrant")]
    assert len(rows) == 6
    exhaustive = next(row for row in rows if "exhaustive, bf16" in row)
    assert float(exhaustive.split("|")[-2]) >= 0.9  # bf16 storage against float32 exact search


def test_training_step():
    out = run("training_step.py", "--tiny")
    row = next(line for line in out.splitlines() if line.startswith("| ") and " s |" in line)
    assert float(row.split("|")[1].split()[0]) > 0  # a step time was measured
    assert "GradCache chunks of 2" in out and "5 MMR groups" in out


def test_vllm_throughput():
    # Runs vLLM's offline engine in .venv-vllm (built by ./run test); fails, not skips, without it.
    out = run(
        "vllm_throughput.py",
        "--items",
        "4",
        "--text-tokens",
        "20",
        "--layers",
        "1",
        "--hidden-size",
        "64",
        "--intermediate-size",
        "128",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "32",
    )
    row = next(line for line in out.splitlines() if line.startswith("| vLLM offline |"))
    assert float(row.split("|")[-2]) > 0
    difference = float(out.rsplit("max |vLLM - model.encode| over the embeddings:", 1)[1])
    assert difference <= 1e-4


def test_serving_payload():
    out = run("serving_payload.py", "--items", "2", "--repeats", "1")
    assert "CPU: " in out
    for shape in ("quickstart (16 x 384)", "7B (64 x 3584)"):
        assert re.search(rf"\| {re.escape(shape)} \| JSON floats \| \d+ \| [\d,]+ \| 1\.0000 \|", out)
        assert re.search(rf"\| {re.escape(shape)} \| base64 bfloat16 \| 4 \| [\d,]+ \| 0\.0\d+ \|", out)


def test_index_build_memory():
    out = run("index_build_memory.py", "--items", "300", "--shard-items", "64", "--dim", "32")
    assert re.search(r"\| build_index \(streamed\) \| [\d.]+ MB \| [\d.]+ \|", out)
    assert re.search(r"\| load\(mmap=True\) \| [\d.]+ MB of [\d.]+ MB \|", out)


def test_qdrant_ingest():
    out = run(
        "qdrant_ingest.py",
        *("--items", "600", "--memory-items", "300", "--disk-items", "60", "--shard-items", "128"),
        *("--dim", "32", "--repeats", "1", "--queries", "5"),
    )
    rows = [line for line in out.splitlines() if line.startswith(("| embedded", "| local"))]
    assert len(rows) == 4
    assert all(float(row.split("|")[6]) > 0 for row in rows)  # a ratio was measured for each engine
    assert out.count("equal to the old path's: True") == 4


def test_pipeline_at_scale():
    out = run("pipeline_at_scale.py", "--items", "3000", "--dim", "32")
    assert re.search(r"\| append 10 % \| [\d.]+ \| [\d,]+ MB \| [\d.]+ GB \|", out)
    assert re.search(r"\| search \(4, 4\) \(3 segments\) \| [\d.]+ / [\d.]+ \| [\d,]+ MB \|", out)
