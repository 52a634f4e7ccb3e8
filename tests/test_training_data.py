"""Records, public-data-set loaders (on local fixtures in their exact schemas), batch sampling, bad input."""

import json

import datasets
import pytest

from metaembed_training.data import (
    ContrastiveDataset,
    MetaEmbedCollator,
    RecordError,
    SourceBatchSampler,
    check_record,
    load_colpali_train,
    load_jsonl,
    load_mmeb_train,
    open_image,
    split_holdout,
)
from tests.conftest import random_image


@pytest.fixture
def mmeb_fixture(tmp_path):
    """Two MMEB-train subsets as parquet files in the data set's schema, with images under an image root."""
    root = tmp_path / "images"
    (root / "ImageNet_1K").mkdir(parents=True)
    (root / "MSCOCO_t2i").mkdir(parents=True)
    for i in range(3):
        random_image(seed=i).save(root / "ImageNet_1K" / f"{i}.jpg")
        random_image(seed=10 + i).save(root / "MSCOCO_t2i" / f"{i}.jpg")
    classification = datasets.Dataset.from_dict(
        {
            "qry": ["<|image_1|>\nRepresent the given image for classification" for _ in range(3)],
            "qry_image_path": [f"ImageNet_1K/{i}.jpg" for i in range(3)],
            "pos_text": ["tench", "goldfish", "shark"],
            "pos_image_path": ["", "", ""],
            "neg_text": ["", "", ""],
            "neg_image_path": ["", "", ""],
        }
    )
    retrieval = datasets.Dataset.from_dict(
        {
            "qry": ["Find me an everyday image that matches the given caption: a dog", "… a cat", "… a bus"],
            "qry_image_path": ["", "", ""],
            "pos_text": ["<|image_1|>\nRepresent the given image."] * 3,
            "pos_image_path": [f"MSCOCO_t2i/{i}.jpg" for i in range(3)],
            "neg_text": ["<|image_1|>\nRepresent the given image."] * 3,
            "neg_image_path": ["MSCOCO_t2i/1.jpg", "MSCOCO_t2i/2.jpg", "MSCOCO_t2i/0.jpg"],
        }
    )
    classification.to_parquet(tmp_path / "ImageNet_1K.parquet")
    retrieval.to_parquet(tmp_path / "MSCOCO_t2i.parquet")
    return tmp_path, root


def test_mmeb_train_loader_reads_the_schema(mmeb_fixture):
    folder, root = mmeb_fixture
    data = load_mmeb_train(
        {"ImageNet_1K": folder / "ImageNet_1K.parquet", "MSCOCO_t2i": folder / "MSCOCO_t2i.parquet"}, image_root=root
    )
    data.validate()
    assert len(data) == 6 and data.sources == ["ImageNet_1K"] * 3 + ["MSCOCO_t2i"] * 3
    first, fourth = data[0], data[3]
    # Subsets are read lazily from their parquet files; image paths resolve against the image root on access.
    assert first["query"] == {
        "text": "Represent the given image for classification",
        "image": str(root / "ImageNet_1K/0.jpg"),
    }
    assert first["positive"] == {"text": "tench", "image": None} and "negatives" not in first
    assert fourth["positive"]["image"] == str(root / "MSCOCO_t2i/0.jpg")
    assert fourth["positive"]["text"] == "Represent the given image."
    assert fourth["negatives"][0]["image"] == str(root / "MSCOCO_t2i/1.jpg")


def test_mmeb_train_loader_names_a_missing_column(tmp_path):
    broken = datasets.Dataset.from_dict({"qry": ["x"], "pos_text": ["y"]})
    with pytest.raises(RecordError, match=r"MMEB-train subset VOC2007 lacks column\(s\) \['qry_image_path'"):
        load_mmeb_train({"VOC2007": broken}, image_root=tmp_path)


def test_colpali_train_loader_reads_the_schema(tmp_path):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_filename": datasets.Value("string"),
            "query": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "source": datasets.Value("string"),
            "options": datasets.Value("string"),
            "page": datasets.Value("string"),
            "model": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "answer_type": datasets.Value("string"),
        }
    )
    rows = {
        "image": [random_image(seed=i) for i in range(4)],
        "image_filename": [f"page_{i}.png" for i in range(4)],
        "query": ["What is the revenue?", "Who signed?", "Which year?", "What colour?"],
        "answer": ["1M", "Ann", "2020", "red"],
        "source": ["docvqa", "docvqa", "arxiv_qa", "arxiv_qa"],
        "options": [None] * 4,
        "page": [""] * 4,
        "model": [""] * 4,
        "prompt": [""] * 4,
        "answer_type": [None] * 4,
    }
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "train-00000-of-00001.parquet")
    data = load_colpali_train(tmp_path / "train-00000-of-00001.parquet")
    data.validate()
    assert data.sources == ["docvqa", "docvqa", "arxiv_qa", "arxiv_qa"]
    record = data[2]
    assert record["query"] == {"text": "Which year?"} and record["id"] == "page_2.png"
    assert set(record["positive"]["image"]) == {"bytes", "path"}  # still encoded: the collator decodes it
    assert open_image(record["positive"]["image"]).size == (90, 60)


def test_jsonl_records_and_holdout(tmp_path):
    random_image(seed=1).save(tmp_path / "cat.png")
    lines = [
        {
            "id": f"r{i}",
            "source": "a" if i < 6 else "b",
            "query": {"text": f"q{i}"},
            "positive": {"text": f"p{i}", "image": "cat.png"},
        }
        for i in range(10)
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    data = load_jsonl(tmp_path / "train.jsonl")
    data.validate()
    train, held_out = split_holdout(data, fraction=0.2, seed=0)
    assert len(held_out) == 2 and len(train) == 8  # round(6 * 0.2) = 1 of source a, round(4 * 0.2) = 1 of b
    assert sorted(held_out.sources) == ["a", "b"]
    ids = {train[i]["id"] for i in range(len(train))} | {held_out[i]["id"] for i in range(len(held_out))}
    assert ids == {f"r{i}" for i in range(10)}
    assert not {train[i]["id"] for i in range(len(train))} & {held_out[i]["id"] for i in range(len(held_out))}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": "x1", "query": {"text": "q"}}, r"record 0 \(id 'x1'\): has no positive"),
        ({"query": {"text": "  "}, "positive": {"text": "p"}}, "record 0: query has an empty text and no image"),
        (
            {"query": {"text": "q"}, "positive": {"text": "p"}, "negatives": [{"text": ""}]},
            "record 0: negative 0 has an empty text and no image",
        ),
        ({"query": {"text": "q", "colour": 1}, "positive": {"text": "p"}}, r"unknown field\(s\) \['colour'\]"),
        ({"query": {"text": 3}, "positive": {"text": "p"}}, "text must be a string"),
        ("not a dict", "must be a dict"),
    ],
)
def test_bad_records_are_named(record, message):
    with pytest.raises(RecordError, match=message):
        check_record(record, 0)


def test_unreadable_image_is_named_before_training(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = [
        {"query": {"text": "fine"}, "positive": {"text": "ok"}},
        {"id": "bad", "query": {"text": "q"}, "positive": {"image": "broken.png"}},
    ]
    with pytest.raises(RecordError, match=r"record 1 \(id 'bad'\): positive: cannot read image .*broken.png"):
        ContrastiveDataset(records, image_root=tmp_path).validate()
    with pytest.raises(RecordError, match="the training data holds no records"):
        ContrastiveDataset([]).validate()


def test_collator_names_an_unreadable_image(tiny_model, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    collator = MetaEmbedCollator(tiny_model("qwen2_5_vl").processor, image_root=tmp_path)
    record = {"id": "bad", "query": {"text": "q"}, "positive": {"image": "broken.png"}, "_index": 7}
    with pytest.raises(RecordError, match=r"record 7 \(id 'bad'\): positive: cannot read image"):
        collator([record])


def test_source_batches_come_from_one_source_and_ranks_share_them():
    sources = ["a"] * 10 + ["b"] * 7 + ["c"] * 3
    single = SourceBatchSampler(sources, batch_size=4, seed=1)
    batches = list(single)
    assert len(batches) == len(single) == 2 + 1  # full batches only (c has none)
    assert all(len({sources[i] for i in batch}) == 1 for batch in batches)
    single.set_epoch(1)
    assert list(single) != batches  # a new order each epoch, the same order for the same epoch
    single.set_epoch(0)
    assert list(single) == batches
    ranks = [SourceBatchSampler(sources, batch_size=2, world_size=2, rank=r, seed=1) for r in range(2)]
    for share0, share1, whole in zip(*ranks, batches):
        assert share0 + share1 == whole  # each rank gets its slice of the same global batch


def test_sampler_refuses_batches_it_cannot_fill():
    with pytest.raises(ValueError, match="no source holds a full global batch of 8"):
        SourceBatchSampler(["a"] * 5, batch_size=4, world_size=2)
    with pytest.raises(ValueError, match="smaller than the 4 processes"):
        SourceBatchSampler(["a"] * 10, batch_size=2, world_size=4, drop_last=False)
    with pytest.raises(ValueError, match="positive integer"):
        SourceBatchSampler(["a"] * 10, batch_size=0)
