"""A shortened run of the README's main command (`./run quickstart`): real packaged weights and data, CPU."""

import io
import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModel

from metaembed.backbones import minilm_path
from metaembed.quickstart import QuickstartSettings, held_out_pages, load_data, query_inputs
from training.evaluation import positive_ranks

ROOT = Path(__file__).resolve().parents[1]
# 512 training emoji -> 128 pages per round (4 rounds, 2 epochs: 32 steps); 128 held-out emoji -> one round of 32
# test pages, asked 128 one-item, 64 two-item and 128 picture queries.
SHORT = ["--train-pairs", "512", "--test-pairs", "128", "--train-rounds", "4", "--test-rounds", "1", "--epochs", "2",
         "--num-query-vectors", "2", "--num-candidate-vectors", "4"]  # fmt: skip


def test_shortened_quickstart_learns_and_saves_a_checkpoint_that_reloads_identically(tmp_path):
    output = tmp_path / "quickstart"
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--output-dir", str(output), *SHORT],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "one R@1" in result.stdout and "(2,4)" in result.stdout

    summary = json.loads((output / "summary.json").read_text())
    pages, counts = 32, {"one item": 128, "two items": 64, "picture": 128}
    reciprocal = [1 / rank for rank in range(1, pages + 1)]
    chance_mrr = sum(reciprocal) / pages  # a random ranking: 0.127 for 32 pages
    chance_sd = (sum(r * r for r in reciprocal) / pages - chance_mrr**2) ** 0.5 / sum(counts.values()) ** 0.5
    full = "2x4"
    # MRR over all 320 queries; a random ranking gives 0.127 +- 0.010 (one sd).
    pooled = sum(summary["quality"][kind]["mrr"][full] * n for kind, n in counts.items()) / sum(counts.values())
    assert pooled > chance_mrr + 3 * chance_sd, summary["quality"]
    quality = summary["quality"]["one item"]
    checkpoint = output / "checkpoint"
    for name in ("README.md", "eval_results.json", "budget_quality.png", "model.safetensors", "modeling_litevl.py"):
        assert (checkpoint / name).is_file(), name
    assert (output / "budget_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (checkpoint / "README.md").read_text()
    assert f"{quality['recall@1'][full]:.4f}".rstrip("0") in card

    # The saved checkpoint, loaded as a user would, gives the embeddings that produced the reported numbers.
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
    settings = QuickstartSettings(**summary["settings"])
    _, test_pairs = load_data(settings)
    (round_,) = held_out_pages(test_pairs, settings)
    pages_embedded = model.encode_candidates([Image.open(io.BytesIO(png)) for png in round_["pages"]])
    queries = model.encode_queries(query_inputs(round_))
    ranks = positive_ranks(model.similarity(queries, pages_embedded, budget=(2, 4)), torch.tensor(round_["targets"]))
    one = [k == "one item" for k in round_["kinds"]]
    mrr = (1.0 / ranks[one].float()).mean().item()
    assert abs(mrr - quality["mrr"][full]) < 1e-6

    # Only the meta tokens' rows of the embedding table learned (their own rate, the vocabulary's rows frozen).
    pretrained = AutoModel.from_pretrained(minilm_path()).get_input_embeddings().weight
    table = model.vlm.get_input_embeddings().weight
    assert torch.equal(table[: pretrained.shape[0]], pretrained)
    meta_ids = model.config.query_meta_token_ids + model.config.candidate_meta_token_ids
    assert min(meta_ids) >= pretrained.shape[0]

    # The probe of why a budget does or does not pay reads the same checkpoint; its "page whole" column is the
    # reported MRR again, its "items alone" column the per-item encoding of the same pages.
    probe = subprocess.run([sys.executable, "examples/probe_vectors.py", str(checkpoint)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    table = probe.stdout.split("| budget | page whole | items alone |")[1]
    rows = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[2:4]]
            for line in table.splitlines() if line.startswith("| (")}  # fmt: skip
    assert set(rows) == {"(1, 1)", "(2, 4)"}, probe.stdout
    assert abs(rows["(2, 4)"][0] - quality["mrr"][full]) < 1e-3
    assert all(1 / 32 <= value <= 1 for value in rows["(2, 4)"] + rows["(1, 1)"])
