"""Small local copies of the benchmarks' public data sets, in their exact schemas (column names, types, layout of
the Hub repos), built from random images: what the evaluation harness reads without a download."""

from pathlib import Path

from datasets import Dataset, Features, Image, Sequence, Value

from tests.conftest import random_image


def _write(rows: dict, features: Features, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(folder / "test-00000-of-00001.parquet"))


MMEB_FEATURES = Features(
    {
        "qry_text": Value("string"),
        "qry_img_path": Value("string"),
        "tgt_text": Sequence(Value("string")),
        "tgt_img_path": Sequence(Value("string")),
    }
)


def make_mmeb(root: Path) -> Path:
    """Three tasks of TIGER-Lab/MMEB-eval: ImageNet-1K (image query, shared label candidates), MSCOCO_t2i (text
    query, image candidates) and RefCOCO (image+text query, image candidates), with an `images/` folder."""
    images = root / "images"
    for task in ("ImageNet-1K", "MSCOCO_t2i", "RefCOCO"):
        (images / task).mkdir(parents=True, exist_ok=True)
    for i in range(12):
        random_image(40 + 3 * i, 32, seed=i).save(images / "ImageNet-1K" / f"{i}.jpg")
        random_image(36, 30 + 2 * i, seed=100 + i).save(images / "MSCOCO_t2i" / f"{i}.jpg")
        random_image(44, 34, seed=200 + i).save(images / "RefCOCO" / f"{i}.jpg")
    labels = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]
    rows = {"qry_text": [], "qry_img_path": [], "tgt_text": [], "tgt_img_path": []}
    for i in range(6):  # the positive first, then the other labels (as MMEB orders them)
        positive = labels[i % 5]
        rows["qry_text"].append("<|image_1|>\nRepresent the given image for classification")
        rows["qry_img_path"].append(f"ImageNet-1K/{i}.jpg")
        rows["tgt_text"].append([positive] + [label for label in labels if label != positive])
        rows["tgt_img_path"].append([""] * 5)
    _write(rows, MMEB_FEATURES, root / "ImageNet-1K")

    rows = {"qry_text": [], "qry_img_path": [], "tgt_text": [], "tgt_img_path": []}
    for i in range(5):
        rows["qry_text"].append(f"Find me an everyday image that matches the given caption: picture {i}")
        rows["qry_img_path"].append("")
        order = [i] + [j for j in range(8) if j != i]
        rows["tgt_text"].append(["<|image_1|>\nRepresent the given image."] * 8)
        rows["tgt_img_path"].append([f"MSCOCO_t2i/{j}.jpg" for j in order])
    _write(rows, MMEB_FEATURES, root / "MSCOCO_t2i")

    rows = {"qry_text": [], "qry_img_path": [], "tgt_text": [], "tgt_img_path": []}
    for i in range(4):
        rows["qry_text"].append(f"<|image_1|>\nSelect the portion of the image that isolates the object {i}")
        rows["qry_img_path"].append(f"RefCOCO/{i}.jpg")
        rows["tgt_text"].append(["<|image_1|>\nRepresent the given cropped image of the object"] * 3)
        rows["tgt_img_path"].append([f"RefCOCO/{(i + j) % 12}.jpg" for j in (4, 5, 6)])
    rows["tgt_img_path"][3][2] = rows["tgt_img_path"][3][0]  # the positive repeated among the candidates
    _write(rows, MMEB_FEATURES, root / "RefCOCO")
    return root


def make_vidore_v1(root: Path) -> Path:
    """A vidore/docvqa_test_subsampled-like data set: one row per page, some without a query, one query twice."""
    features = Features(
        {
            "query": Value("string"),
            "image": Image(),
            "image_filename": Value("string"),
            "answer": Value("string"),
            "page": Value("string"),
        }
    )
    queries = [
        "what is the total?",
        None,
        "who signed the letter?",
        "what is the total?",
        "when was it issued?",
        None,
        "which table lists costs?",
    ]
    rows = {
        "query": queries,
        "image": [random_image(50, 64, seed=300 + i) for i in range(len(queries))],
        "image_filename": [f"page_{i}.png" for i in range(len(queries))],
        "answer": ["x"] * len(queries),
        "page": [str(i) for i in range(len(queries))],
    }
    _write(rows, features, root / "data")
    return root


def make_vidore_v2(root: Path) -> Path:
    """A vidore/esg_reports_v2-like BEIR data set: corpus, queries (with languages) and graded qrels."""
    corpus = Features({"corpus-id": Value("int64"), "image": Image(), "doc-id": Value("string")})
    _write(
        {
            "corpus-id": list(range(9)),
            "image": [random_image(48, 60, seed=400 + i) for i in range(9)],
            "doc-id": ["report"] * 9,
        },
        corpus,
        root / "corpus",
    )
    queries = Features({"query-id": Value("int64"), "query": Value("string"), "language": Value("string")})
    _write(
        {
            "query-id": [0, 1, 2, 3, 4],
            "language": ["english", "english", "french", "english", "english"],
            "query": ["emissions in 2022", "board diversity", "émissions de 2022", "water use", "no judged pages"],
        },
        queries,
        root / "queries",
    )
    qrels = Features({"query-id": Value("int64"), "corpus-id": Value("int64"), "score": Value("int64")})
    _write(
        {"query-id": [0, 0, 1, 2, 2, 3], "corpus-id": [1, 4, 2, 1, 4, 7], "score": [2, 1, 1, 2, 1, 1]},
        qrels,
        root / "qrels",
    )
    return root
