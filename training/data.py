"""Training data: one record format, loaders for the paper's public training sets, a one-source batch sampler and
the collator that turns records into model inputs.

Record format (a JSON Lines file, a list of dicts, or a `datasets.Dataset` with these columns):

    {
      "id": "optional, used in error messages",
      "source": "optional name of the source data set (batches are drawn from one source)",
      "query":     {"text": "...", "image": "path | PIL image | null", "instruction": "optional",
                    "reasoning": "optional Think-Then-Embed trace"},
      "positive":  {"text": "...", "image": "..."},
      "negatives": [{"text": "...", "image": "..."}, ...]       (optional hard negatives)
    }

Each side needs a non-empty text, an image, or both. Relative image paths resolve against `image_root`.
A query's `instruction` replaces the model's default query instruction ("Query: "). A `reasoning` trace is
joined to the side's text by `config.reasoning_template`, as `model.encode(..., traces=...)` does at inference
(allowed on the roles in `config.reasoning_roles`: queries by default). `training.reasoning` writes the traces.
"""

import bisect
import functools
import io
import itertools
import json
import math
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from modeling_metaembed.processing_metaembed import EncodeItem

RECORD_SIDES = ("query", "positive")
PLACEHOLDER_IMAGE_SIZE = 56  # pixels per side: a few visual tokens, enough to run the vision tower


class RecordError(ValueError):
    """A training record that cannot be used; the message names the record and what is wrong."""


def _record_name(record: dict, index: int) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"record {index}" + (f" (id {rid!r})" if rid is not None else "")


def _check_side(side, where: str) -> None:
    if not isinstance(side, dict):
        raise RecordError(f"{where} must be a dict with 'text' and/or 'image', got {type(side).__name__}")
    unknown = set(side) - {"text", "image", "instruction", "reasoning"}
    if unknown:
        raise RecordError(f"{where} has unknown field(s) {sorted(unknown)}")
    text, image = side.get("text"), side.get("image")
    if text is not None and not isinstance(text, str):
        raise RecordError(f"{where} text must be a string, got {type(text).__name__}")
    if image is None and (text is None or not text.strip()):
        raise RecordError(f"{where} has an empty text and no image")
    instruction = side.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise RecordError(f"{where} instruction must be a string, got {type(instruction).__name__}")
    reasoning = side.get("reasoning")
    if reasoning is not None and (not isinstance(reasoning, str) or not reasoning.strip()):
        raise RecordError(f"{where} reasoning must be a non-empty string, got {reasoning!r}")


def check_record(record, index: int) -> None:
    """Raise RecordError naming the record when it does not follow the record format."""
    name = _record_name(record, index)
    if not isinstance(record, dict):
        raise RecordError(f"{name}: must be a dict, got {type(record).__name__}")
    for side in RECORD_SIDES:
        if record.get(side) is None:
            raise RecordError(f"{name}: has no {side}")
        _check_side(record[side], f"{name}: {side}")
    negatives = record.get("negatives") or []
    if not isinstance(negatives, list):
        raise RecordError(f"{name}: negatives must be a list, got {type(negatives).__name__}")
    for k, negative in enumerate(negatives):
        _check_side(negative, f"{name}: negative {k}")


def open_image(image, image_root=None, where: str = "image") -> Image.Image:
    """A PIL image from a PIL image, a path (relative to image_root), or a `datasets` image dict."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and (image.get("bytes") or image.get("path")):  # datasets.Image(decode=False)
        if image.get("bytes"):
            return _open(io.BytesIO(image["bytes"]), where)
        image = image["path"]
    if isinstance(image, (str, Path)):
        path = Path(image)
        if image_root is not None and not path.is_absolute():
            path = Path(image_root) / path
        return _open(path, where)
    raise RecordError(f"{where}: unsupported image value of type {type(image).__name__}")


def _open(source, where: str) -> Image.Image:
    try:
        image = Image.open(source)
        image.load()
        return image
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RecordError(f"{where}: cannot read image {source}: {error}") from error


class ContrastiveDataset(torch.utils.data.Dataset):
    """Training records (see the module docstring), read lazily from a list or a `datasets.Dataset`.

    Args:
        records: a list of record dicts, a `datasets.Dataset` of records, or any indexable of them.
        image_root: folder that relative image paths resolve against.
        convert: optional function (row) -> record applied on access (the public-data-set loaders use it).
        sources: optional list with each record's source name (otherwise read from the records).
    """

    def __init__(self, records, image_root=None, convert=None, sources=None):
        self.records = records
        self.image_root = image_root
        self.convert = convert
        self._sources = sources

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        if self.convert is not None:
            record = self.convert(record)
        record = dict(record)
        record["_index"] = index
        return record

    @property
    def sources(self) -> list:
        """Each record's source name, read without touching anything else of a record (no image is decoded):
        the given list, else a `source` column, else the `source` field of in-memory dict records."""
        if self._sources is None:
            records = self.records
            if hasattr(records, "column_names"):  # a datasets.Dataset: read one column
                has_column = "source" in records.column_names
                self._sources = list(records["source"]) if has_column else [None] * len(records)
            elif isinstance(records, list) and self.convert is None:
                self._sources = [r.get("source") if isinstance(r, dict) else None for r in records]
            else:
                self._sources = [self[i].get("source") for i in range(len(self))]
        return self._sources

    @classmethod
    def concatenate(cls, parts: list) -> "ContrastiveDataset":
        """One dataset over several, lazily: a record is read from its part when it is accessed, and relative image
        paths resolve against that part's image_root. Nothing is copied or decoded here."""
        if len(parts) == 1:
            return parts[0]
        return cls(_Concatenation(parts), sources=[s for part in parts for s in part.sources])

    def fingerprint(self) -> str:
        """A digest of the records (and how they are read), for caches such as the validation marker."""
        import hashlib

        digest = hashlib.sha256(type(self.records).__name__.encode())
        digest.update(str(self.image_root).encode())
        digest.update(_callable_name(self.convert).encode())
        records = self.records
        if isinstance(records, (_Concatenation, _Subset)):
            digest.update(records.fingerprint().encode())
        elif getattr(records, "_fingerprint", None):  # a datasets.Dataset knows its own
            digest.update(records._fingerprint.encode())
        else:
            for record in records:
                digest.update(json.dumps(record, sort_keys=True, default=str).encode())
        return digest.hexdigest()

    def validate(
        self,
        check_images: bool = True,
        show_progress_bar: bool = False,
        rank: int = 0,
        world_size: int = 1,
        cache_dir=None,
    ) -> None:
        """Check records (and, by default, that every image opens) before any training step.

        With several processes each checks its share (every `world_size`-th record from `rank`), so the images are
        opened once in all, not once per process. With `cache_dir`, a passed check leaves a marker keyed by the
        records' fingerprint and the share, and a rerun (a resumed job) skips it; delete the folder to check again.
        """
        from transformers.utils.logging import tqdm

        if len(self) == 0:
            raise RecordError("the training data holds no records")
        marker = None
        if cache_dir is not None:
            what = "images" if check_images else "records"
            marker = Path(cache_dir) / f"{self.fingerprint()[:32]}-{what}-{rank}of{world_size}.ok"
            if marker.exists():
                return
        indices = range(rank, len(self), world_size)
        for index in tqdm(indices, desc="Checking records", disable=not show_progress_bar):
            record = self[index]
            check_record(record, index)
            if not check_images:
                continue
            name = _record_name(record, index)
            sides = [(side, record[side]) for side in RECORD_SIDES]
            sides += [(f"negative {k}", n) for k, n in enumerate(record.get("negatives") or [])]
            for label, side in sides:
                if side.get("image") is not None:
                    open_image(side["image"], self.image_root, f"{name}: {label}").close()
        if marker is not None:
            from modeling_metaembed.hub_metaembed import write_atomic

            marker.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(marker, f"{len(self)} records checked\n")

    def subset(self, indices) -> "ContrastiveDataset":
        indices = list(indices)
        sources = [self.sources[i] for i in indices]
        return ContrastiveDataset(_Subset(self.records, indices), self.image_root, self.convert, sources)


def _callable_name(function) -> str:
    if function is None:
        return ""
    if isinstance(function, functools.partial):
        return f"{_callable_name(function.func)}{function.args}{sorted(function.keywords.items())}"
    return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', repr(function))}"


def _resolve_images(record: dict, image_root) -> dict:
    """The record with its relative image paths made absolute against `image_root` (sides copied, not changed)."""
    record = dict(record)
    record.pop("_index", None)
    if image_root is None:
        return record

    def resolve(side):
        image = side.get("image") if isinstance(side, dict) else None
        if isinstance(image, str) and not Path(image).is_absolute():
            return dict(side, image=str(Path(image_root) / image))
        return side

    for key in RECORD_SIDES:
        if key in record:
            record[key] = resolve(record[key])
    if isinstance(record.get("negatives"), list):
        record["negatives"] = [resolve(n) for n in record["negatives"]]
    return record


class _Concatenation:
    """Records of several `ContrastiveDataset`s end to end, read from their parts on access."""

    def __init__(self, parts: list):
        self.parts = parts
        self.ends = list(itertools.accumulate(len(part) for part in parts))

    def __len__(self):
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} is outside the {len(self)} records")
        part = bisect.bisect_right(self.ends, index)
        start = self.ends[part - 1] if part else 0
        dataset = self.parts[part]
        return _resolve_images(dataset[index - start], dataset.image_root)

    def fingerprint(self) -> str:
        return ",".join(part.fingerprint() for part in self.parts)


class _Subset:
    def __init__(self, records, indices):
        self.records, self.indices = records, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.records[self.indices[index]]

    def fingerprint(self) -> str:
        import hashlib

        inner = self.records.fingerprint() if hasattr(self.records, "fingerprint") else ""
        inner += str(getattr(self.records, "_fingerprint", ""))
        return hashlib.sha256((inner + json.dumps(self.indices)).encode()).hexdigest()


def load_jsonl(path, image_root=None) -> ContrastiveDataset:
    """Records from a JSON Lines file; relative image paths resolve against image_root (default: the file's folder)."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise RecordError(f"{path}:{line_number}: not valid JSON: {error}") from error
    return ContrastiveDataset(records, image_root=image_root if image_root is not None else path.parent)


def split_holdout(dataset: ContrastiveDataset, fraction: float = 0.01, seed: int = 0) -> tuple:
    """(train, held-out) subsets, holding out `fraction` of every source (at least one record each; paper: 1%)."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must lie in (0, 1), got {fraction!r}")
    by_source = defaultdict(list)
    for index, source in enumerate(dataset.sources):
        by_source[source].append(index)
    rng = random.Random(seed)
    train, held_out = [], []
    for source in sorted(by_source, key=str):
        indices = by_source[source][:]
        rng.shuffle(indices)
        count = max(1, round(len(indices) * fraction)) if len(indices) > 1 else 0
        held_out += indices[:count]
        train += indices[count:]
    return dataset.subset(sorted(train)), dataset.subset(sorted(held_out))


# ------------------------------------------------------------------------------------------ public training sets
MMEB_IMAGE_TOKEN = "<|image_1|>"  # the Phi-3-V image placeholder MMEB writes into its texts


def _mmeb_text(text) -> str | None:
    if text is None:
        return None
    text = text.replace(MMEB_IMAGE_TOKEN, "").strip()
    return text or None


def mmeb_row_to_record(row: dict, source: str | None = None) -> dict:
    """A row of MMEB-train (TIGER-Lab/MMEB-train: qry, qry_image_path, pos_text, pos_image_path, neg_text,
    neg_image_path) as a training record. The task instruction is part of MMEB's query text."""
    record = {
        "source": source,
        "query": {"text": _mmeb_text(row.get("qry")), "image": row.get("qry_image_path") or None},
        "positive": {"text": _mmeb_text(row.get("pos_text")), "image": row.get("pos_image_path") or None},
    }
    negative = {"text": _mmeb_text(row.get("neg_text")), "image": row.get("neg_image_path") or None}
    if negative["text"] is not None or negative["image"] is not None:
        record["negatives"] = [negative]
    return record


def load_mmeb_train(subsets: dict, image_root) -> ContrastiveDataset:
    """MMEB-train as training records, each subset its own source.

    Args:
        subsets: {subset name: a `datasets.Dataset` in the MMEB-train schema, or a path to its parquet/JSONL file}.
            On a machine with the Hub: `{name: load_dataset("TIGER-Lab/MMEB-train", name, split="original")}`.
        image_root: the folder the data set's image archive was extracted to (paths such as "ImageNet_1K/...").
    """
    parts = []
    for name, data in subsets.items():
        data = _as_dataset(data)
        _require_columns(data, ("qry", "qry_image_path", "pos_text", "pos_image_path"), f"MMEB-train subset {name}")
        convert = functools.partial(mmeb_row_to_record, source=name)  # rows are read (lazily) on access
        parts.append(ContrastiveDataset(data, image_root=image_root, convert=convert, sources=[name] * len(data)))
    if not parts:
        raise RecordError("MMEB-train: no subsets given")
    return ContrastiveDataset.concatenate(parts)


def colpali_row_to_record(row: dict) -> dict:
    """A row of the ColPali/ViDoRe training set (vidore/colpali_train_set: query, image, image_filename, source,
    answer, ...): the query text retrieves the page image."""
    return {
        "id": row.get("image_filename"),
        "source": row.get("source"),
        "query": {"text": row.get("query")},
        "positive": {"image": row.get("image")},
    }


def load_colpali_train(data) -> ContrastiveDataset:
    """The ColPali/ViDoRe training set as records; batches are drawn per `source` column (docvqa, arxiv_qa, ...).

    Args:
        data: a `datasets.Dataset` in that schema (`load_dataset("vidore/colpali_train_set", split="train")`) or a
            path to its parquet files.
    """
    data = _as_dataset(data)
    _require_columns(data, ("query", "image"), "ColPali train set")
    features = getattr(data, "features", None) or {}
    if getattr(features.get("image"), "decode", False):  # keep pages as bytes: decoded by the collator, in workers
        import datasets

        data = data.cast_column("image", datasets.Image(decode=False))
    sources = list(data["source"]) if "source" in data.column_names else [None] * len(data)
    return ContrastiveDataset(data, convert=colpali_row_to_record, sources=sources)


def _as_dataset(data):
    if isinstance(data, (str, Path)):
        import datasets

        path = str(data)
        kind = "json" if path.endswith((".jsonl", ".json")) else "parquet"
        return datasets.load_dataset(kind, data_files=path, split="train")
    return data


def _require_columns(data, columns, what: str) -> None:
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise RecordError(f"{what} lacks column(s) {missing}; it has {data.column_names}")


# ------------------------------------------------------------------------------------------------------ batching
class SourceBatchSampler(torch.utils.data.Sampler):
    """Batches drawn from one source data set at a time (in-batch negatives then come from the same task), in a
    random order that depends only on (seed, epoch); each rank gets its slice of the same global batch.

    Args:
        sources: each record's source name (None: one source).
        batch_size: records per rank per batch (per_device_train_batch_size).
        world_size / rank: data-parallel processes (the global batch holds batch_size * world_size records).
        drop_last: drop each source's last incomplete global batch (default; keeps batch statistics equal).
    """

    def __init__(self, sources, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0, drop_last=True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"per-device batch size must be a positive integer, got {batch_size!r}")
        self.sources = list(sources)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0
        self.by_source = defaultdict(list)
        for index, source in enumerate(self.sources):
            self.by_source[source].append(index)
        global_batch = batch_size * world_size
        if drop_last and all(len(v) < global_batch for v in self.by_source.values()):
            raise ValueError(
                f"no source holds a full global batch of {global_batch} records (per-device batch {batch_size} x "
                f"{world_size} processes); largest source has {max(len(v) for v in self.by_source.values())}"
            )
        if not drop_last:
            for source, indices in self.by_source.items():
                rest = len(indices) % global_batch
                if 0 < rest < world_size:
                    raise ValueError(
                        f"source {source!r} would end with a batch of {rest} records, smaller than the {world_size} "
                        "processes: every process needs at least one; set drop_last (dataloader_drop_last)"
                    )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        global_batch = self.batch_size * self.world_size
        batches = []
        for source in sorted(self.by_source, key=str):
            indices = self.by_source[source][:]
            rng.shuffle(indices)
            for start in range(0, len(indices), global_batch):
                batch = indices[start : start + global_batch]
                if len(batch) == global_batch or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        for batch in self._global_batches():
            # Contiguous, as even as possible: a full batch gives every rank batch_size; a short last one is shared.
            bounds = [round(i * len(batch) / self.world_size) for i in range(self.world_size + 1)]
            yield batch[bounds[self.rank] : bounds[self.rank + 1]]

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world_size
        round_ = math.floor if self.drop_last else math.ceil
        return sum(round_(len(v) / global_batch) for v in self.by_source.values())


class MetaEmbedCollator:
    """Records -> model inputs: one list of query chunks and one list of candidate chunks (positives, then every
    hard negative), each chunk a processed batch. Without GradCache there is one chunk per side.

    Args:
        processor: the model's `MetaEmbedProcessor`.
        image_root: folder relative image paths resolve against (default: the dataset's).
        chunk_size: rows per chunk (GradCache); None processes each side as one batch.
        placeholder_image: give a chunk with no image a placeholder image row, so the vision tower runs on every
            process (FSDP/ZeRO otherwise hang when one rank has no image); its embedding is not used.
        max_negatives: keep at most this many hard negatives per record (None: all).
    """

    def __init__(self, processor, image_root=None, chunk_size=None, placeholder_image=False, max_negatives=None):
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if placeholder_image and not processor.has_vision:
            raise ValueError("placeholder_image needs a vision backbone; this processor is text-only")
        self.processor = processor
        # A model loaded with trust_remote_code has its own copy of the processing module: build items with that
        # copy's EncodeItem, or the processor would not recognise them.
        self.item_class = getattr(sys.modules.get(type(processor).__module__), "EncodeItem", EncodeItem)
        self.image_root = image_root
        self.chunk_size = chunk_size
        self.placeholder_image = placeholder_image
        self.max_negatives = max_negatives

    def _item(self, side: dict, position: int, name: str, label: str, role: str) -> tuple:
        image = side.get("image")
        if image is not None:
            image = open_image(image, self.image_root, f"{name}: {label}")
        reasoning = side.get("reasoning")
        if reasoning is not None and role not in self.processor.config.reasoning_roles:
            raise RecordError(
                f"{name}: {label} carries reasoning, but the model conditions only "
                f"{self.processor.config.reasoning_roles} inputs on traces (config.reasoning_roles)"
            )
        return self.item_class(position, side.get("text"), image), side.get("instruction"), reasoning

    def __call__(self, records: list) -> dict:
        queries, candidates, negatives, owners = [], [], [], []
        for row, record in enumerate(records):
            index = record.get("_index", row)
            check_record(record, index)
            name = _record_name(record, index)
            queries.append(self._item(record["query"], row, name, "query", "query"))
            candidates.append(self._item(record["positive"], row, name, "positive", "candidate"))
            kept = (record.get("negatives") or [])[: self.max_negatives]
            for k, negative in enumerate(kept):
                negatives.append(self._item(negative, len(negatives), name, f"negative {k}", "candidate"))
                owners.append(row)
        candidates += negatives
        return {
            "queries": self._chunks(queries, "query"),
            "candidates": self._chunks(candidates, "candidate"),
            "negative_owners": torch.tensor(owners, dtype=torch.long),
        }

    def _chunks(self, entries: list, role: str) -> list:
        size = self.chunk_size or max(1, len(entries))
        chunks = []
        for start in range(0, len(entries), size):
            part = entries[start : start + size]
            items = [self.item_class(i, item.text, item.image) for i, (item, _, _) in enumerate(part)]
            instructions = [instruction for _, instruction, _ in part]
            traces = [reasoning for _, _, reasoning in part]
            if any(trace is not None for trace in traces):  # Think-Then-Embed: the trace joins the text
                items = self.processor.condition_on_traces(items, traces)
            placeholders = 0
            if self.placeholder_image and all(item.image is None for item in items):
                gray = Image.new("RGB", (PLACEHOLDER_IMAGE_SIZE, PLACEHOLDER_IMAGE_SIZE), (128, 128, 128))
                items.append(self.item_class(len(items), None, gray))
                instructions.append(None)
                placeholders = 1
            if all(instruction is None for instruction in instructions):
                instructions = None
            inputs = dict(self.processor(items, role=role, instruction=instructions))
            chunks.append({"inputs": inputs, "num_placeholders": placeholders})
        return chunks


__all__ = [
    "RecordError",
    "check_record",
    "open_image",
    "ContrastiveDataset",
    "load_jsonl",
    "split_holdout",
    "load_mmeb_train",
    "load_colpali_train",
    "mmeb_row_to_record",
    "colpali_row_to_record",
    "SourceBatchSampler",
    "MetaEmbedCollator",
]
