"""The README's main command (`./run quickstart`) as a user runs it: real packaged weights and data, CPU, ~10 min.

It is the whole main job, not a shortened one: shorter runs were measured and could not support a margin for the
budget's gain (docs/quickstart.md, "What CI checks")."""

import io
import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModel

from metaembed.backbones import minilm_path
from metaembed.quickstart import QuickstartSettings, held_out_pages, load_data, query_inputs, query_kind_masks
from training.evaluation import positive_ranks

ROOT = Path(__file__).resolve().parents[1]
# Picture MRR at (4,16) minus at (1,1) of the main job on this project's machine, seeds 0, 1, 2: 0.055, 0.058,
# 0.083 (docs/quickstart.md). The test asserts half the smallest: another CPU's arithmetic changes the run as a
# seed does.
PICTURE_GAIN_FLOOR = 0.027


def test_main_job_gains_from_the_budget_and_saves_a_checkpoint_that_reloads_identically(tmp_path):
    output = tmp_path / "quickstart"
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--output-dir", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "one R@1" in result.stdout and "(4,16)" in result.stdout

    summary = json.loads((output / "summary.json").read_text())
    # 2 rounds of 92 held-out pages, each asked 368 one-item, 184 two-item and 368 picture queries.
    pages, counts = 92, {"one item": 736, "two items": 368, "picture": 736}
    reciprocal = [1 / rank for rank in range(1, pages + 1)]
    chance_mrr = sum(reciprocal) / pages  # a random ranking: 0.056 for 92 pages
    chance_sd = (sum(r * r for r in reciprocal) / pages - chance_mrr**2) ** 0.5 / sum(counts.values()) ** 0.5
    full = "4x16"
    # MRR over all 1,840 queries; a random ranking gives 0.056 +- 0.003 (one sd).
    pooled = sum(summary["quality"][kind]["mrr"][full] * n for kind, n in counts.items()) / sum(counts.values())
    assert pooled > chance_mrr + 3 * chance_sd, summary["quality"]
    # Test-time scaling: on picture queries, where one vector per page is the bottleneck, the full budget beats
    # one vector per side by a margin every measured seed cleared twice over.
    picture = summary["quality"]["picture"]["mrr"]
    assert picture[full] - picture["1x1"] > PICTURE_GAIN_FLOOR, picture
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
    ranks = []
    for round_ in held_out_pages(test_pairs, settings):
        pages_embedded = model.encode_candidates([Image.open(io.BytesIO(png)) for png in round_["pages"]])
        queries = model.encode_queries(query_inputs(round_))
        scores = model.similarity(queries, pages_embedded, budget=(4, 16))
        found = positive_ranks(scores, torch.tensor(round_["targets"]))
        ranks.append(found[query_kind_masks(round_["kinds"])["picture"]])
    mrr = (1.0 / torch.cat(ranks).float()).mean().item()
    assert abs(mrr - picture[full]) < 1e-6

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
    assert set(rows) == {"(1, 1)", "(4, 16)"}, probe.stdout
    assert abs(rows["(4, 16)"][0] - quality["mrr"][full]) < 1e-3
    assert all(1 / pages <= value <= 1 for value in rows["(4, 16)"] + rows["(1, 1)"])
