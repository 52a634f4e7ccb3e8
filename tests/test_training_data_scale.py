"""Training data at scale: a recipe's data stays lazy from loading to the collator, measured by memory growth in a
fresh process, and batches are decoded in data-loader workers."""

import json
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from metaembed_training.data import ContrastiveDataset, MetaEmbedCollator, SourceBatchSampler
from metaembed_training.train import build_data
from tests.conftest import random_image

PAGES = 96
PAGE_SIDE = 768  # a decoded page: 768 x 768 x 3 bytes = 1.7 MB; all pages 170 MB


def page(seed: int) -> Image.Image:
    """A smooth page: tiny as a PNG, large once decoded."""
    ramp = np.linspace(0, 255, PAGE_SIDE, dtype=np.uint8)
    pixels = np.stack([np.add.outer(ramp, ramp // (seed % 7 + 1)).astype(np.uint8)] * 3, axis=-1)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory):
    """A recipe's data section with two parts: a ColPali-schema parquet of page images and a JSON Lines file."""
    folder = tmp_path_factory.mktemp("scale-data")
    features = datasets.Features(
        {"image": datasets.Image(), "query": datasets.Value("string"), "source": datasets.Value("string")}
    )
    rows = {
        "image": [page(i) for i in range(PAGES)],
        "query": [f"what does page {i} say?" for i in range(PAGES)],
        "source": ["docvqa" if i % 2 else "arxiv_qa" for i in range(PAGES)],
    }
    datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / "pages.parquet")
    random_image(seed=3).save(folder / "cat.png")
    lines = [{"query": {"text": f"q{i}"}, "positive": {"image": "cat.png"}, "source": "cats"} for i in range(32)]
    (folder / "cats.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return {
        "colpali_train": str(folder / "pages.parquet"),
        "jsonl": [str(folder / "cats.jsonl")],
        "holdout_fraction": 0.1,
    }


MEASURE = """
import json, sys
from metaembed_training.train import build_data
from metaembed_training.data import SourceBatchSampler

def anonymous_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

settings = json.loads(sys.argv[1])
before = anonymous_kb()
train, held_out = build_data(settings)
sampler = SourceBatchSampler(train.sources, batch_size=8)
train.validate(check_images=False)
held_out.validate(check_images=False)
first_batch = [train[i] for i in next(iter(sampler))]
print(json.dumps({"grew_kb": anonymous_kb() - before, "records": len(train) + len(held_out)}))
"""


def test_building_a_recipes_data_does_not_decode_its_images(recipe_data):
    """Before the fix, concatenating the two parts copied every record (decoding every page: ~170 MB here,
    ~118k pages in a paper recipe)."""
    decoded_bytes = PAGES * PAGE_SIDE * PAGE_SIDE * 3
    # Imports first (their memory is not the data's), then the measurement, in a fresh process.
    script = "import datasets, torch, metaembed_training.data, metaembed_training.train\n" + textwrap.dedent(MEASURE)
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(recipe_data)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["records"] == PAGES + 32
    grew = measured["grew_kb"] * 1024
    assert grew < decoded_bytes / 8, f"building the data grew anonymous memory by {grew / 2**20:.0f} MiB"


def test_images_are_decoded_in_data_loader_workers(recipe_data, tiny_model):
    """The collator opens images; with workers it runs in them, and the batches equal the in-process ones."""
    model = tiny_model("qwen2_5_vl")
    train, _ = build_data(recipe_data)
    assert isinstance(train[0]["positive"]["image"], (dict, str))  # still encoded / a path in the record
    collator = MetaEmbedCollator(model.processor)
    sampler = SourceBatchSampler(train.sources, batch_size=4, seed=1)
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collator, num_workers=workers)
        batches[workers] = [batch for _, batch in zip(range(3), loader)]
    for plain, parallel in zip(batches[0], batches[2]):
        for side in ("queries", "candidates"):
            for key, value in plain[side][0]["inputs"].items():
                other = parallel[side][0]["inputs"].get(key)
                if isinstance(value, torch.Tensor) and value.is_floating_point():  # pixel values: a worker runs
                    # one torch thread, this process more, and float32 preprocessing may round differently
                    torch.testing.assert_close(value, other, atol=1e-6, rtol=0, msg=lambda m: f"{side} {key}: {m}")
                elif isinstance(value, torch.Tensor):
                    assert torch.equal(value, other), (side, key)


def test_validation_shares_the_checks_across_processes_and_remembers_them(tmp_path):
    opened = []

    class CountingRecords(list):
        def __getitem__(self, index):
            opened.append(index)
            return super().__getitem__(index)

    records = CountingRecords({"query": {"text": f"q{i}"}, "positive": {"text": f"p{i}"}} for i in range(10))
    data = ContrastiveDataset(records)
    for rank in range(3):  # three processes, each its share
        data.validate(rank=rank, world_size=3, cache_dir=tmp_path)
    assert sorted(opened) == list(range(10))  # every record checked exactly once in all
    opened.clear()
    data.validate(rank=1, world_size=3, cache_dir=tmp_path)  # a rerun (resume) skips a passed check
    assert opened == []
    records[4] = {"query": {"text": "changed"}, "positive": {"text": ""}}  # other records: checked again
    with pytest.raises(ValueError, match="record 4"):
        data.validate(rank=1, world_size=3, cache_dir=tmp_path)
