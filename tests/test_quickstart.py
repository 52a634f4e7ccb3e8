"""A shortened run of the README's main command (`./run quickstart`): real packaged weights and data, CPU."""

import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoModel

from metaembed.quickstart import load_data
from metaembed.twemoji import retrieval_records
from training.evaluation import recall_and_mrr

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--train-pairs", "512", "--test-pairs", "128", "--epochs", "2", "--num-query-vectors", "4",
         "--num-candidate-vectors", "8", "--image-size", "96"]  # fmt: skip


def test_shortened_quickstart_learns_and_saves_a_checkpoint_that_reloads_identically(tmp_path):
    output = tmp_path / "quickstart"
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--output-dir", str(output), *SHORT],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "t2i R@1" in result.stdout and "(4,8)" in result.stdout

    summary = json.loads((output / "summary.json").read_text())
    pairs = summary["test_pairs"]
    chance_recall = 1 / pairs
    chance_mrr = sum(1 / rank for rank in range(1, pairs + 1)) / pairs  # a random ranking: 0.042 for 128 pairs
    full = "4x8"
    # MRR uses every query's rank; Recall@1 over 128 pairs counts a few hits (3 to 10 here, 1 by chance), too few
    # for a tight bound that holds on every CPU's float rounding. Chance MRR is 0.042 +- 0.009 (one sd) for 128
    # queries, so twice that is more than four sds above chance.
    for direction in ("text-to-image", "image-to-text"):
        quality = summary["quality"][direction]
        assert quality["mrr"][full] > 2 * chance_mrr, summary["quality"]
        assert quality["recall@1"][full] > chance_recall, summary["quality"]
    checkpoint = output / "checkpoint"
    for name in ("README.md", "eval_results.json", "budget_quality.png", "model.safetensors", "modeling_litevl.py"):
        assert (checkpoint / name).is_file(), name
    assert (output / "budget_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (checkpoint / "README.md").read_text()
    assert f"{summary['quality']['text-to-image']['recall@1'][full]:.4f}".rstrip("0") in card

    # The saved checkpoint, loaded as a user would, gives the embeddings that produced the reported numbers.
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
    _, test_pairs = load_data(type("S", (), {"train_pairs": 512, "test_pairs": 128})())
    records = retrieval_records(test_pairs, "text-to-image")
    queries = model.encode_queries([r["query"]["text"] for r in records])
    candidates = model.encode_candidates([r["positive"]["image"] for r in records])
    scores = model.similarity(queries, candidates, budget=(4, 8))
    recall, _ = recall_and_mrr(scores)  # the definition the quickstart's evaluation used
    assert abs(recall - summary["quality"]["text-to-image"]["recall@1"][full]) < 1e-6
