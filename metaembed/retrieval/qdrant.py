"""MetaEmbed candidates in Qdrant: the serving path once an index outgrows one process.

`QdrantMetaEmbedIndex` writes each item as one Qdrant point with named vectors:

    "coarse"        vector 0 of the item (a plain dense vector, HNSW-indexed): the budget-(1, 1) embedding
    "maxsim_<r_c>"  the item's first r_c vectors as a multivector compared with MAX_SIM, one field per candidate
                    budget chosen at creation (HNSW off: these fields only re-rank), optionally quantized by
                    Qdrant itself (scalar int8 or binary) with re-scoring from the original vectors

and searches in Qdrant's own query engine: a prefetch on "coarse" with the query's first vector shortlists
candidates, then MaxSim on "maxsim_<r_c>" with the query's first r_q vectors re-ranks them, which is
`MetaEmbedIndex.search_two_stage` run by the database. Without a shortlist the MaxSim field is scanned in full
(`MetaEmbedIndex.search`). The query side's budget r_q is free at search time; r_c is one of the fields created.

Qdrant scores a multivector field whole (its MAX_SIM has no "first r_c vectors" option), so each budget needs its
own field: a point stores (1 + the budgets above 1) x D values, nothing beyond the chosen budgets, in float32 or,
with `datatype="float16"`, Qdrant's float16 storage (half the bytes; scores within r_q * 2^-10 for unit vectors).

Two engines, one code path: everything above is written once against a small backend (create, write, count,
query), implemented for `qdrant_client.QdrantClient` (a server or cluster by URL, or its Python local mode,
`QdrantClient(":memory:")` / `QdrantClient(path=...)`) and for `Edge`, Qdrant's own Rust engine running in this
process (`qdrant-edge-py`: the server's segment code, HNSW, MAX_SIM and quantization, without a server). Writes go
in batches: qdrant-client's `upload_collection` with numpy arrays (over gRPC it sends their bytes, no per-float
conversion), the embedded engine's `upsert_points` with each row a memoryview of the batch that every field shares.
`add_from_embeddings` streams an embeddings folder shard by shard. Point ids are UUIDs derived from the item ids
(kept in the payload), so re-adding an item replaces it: an interrupted upload can be re-run from the start.
"""

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import torch

from modeling_metaembed.hub_metaembed import write_atomic
from modeling_metaembed.scoring_metaembed import check_budget

from .index import SearchResult, as_query_batch

FORMAT = "metaembed-qdrant/1"
COARSE = "coarse"
ID_KEY = "metaembed_id"
QUANTIZATIONS = ("int8", "binary")
DATATYPES = ("float32", "float16")  # Qdrant's vector storage types that keep a float embedding (uint8 takes integers)
FLOAT16_MAX = 65504.0
# Qdrant caps one point's multivector at this many floats in total (r_c * dim); the embedded engine does not check
# it, a server rejects the point: we refuse such a field when the collection is created.
MULTIVECTOR_FLOAT_CAP = 1_048_576
_ID_NAMESPACE = uuid.UUID("6f1d4b52-3b1e-4c38-9a5e-2f6d0c1a7e90")


def maxsim_field(r_c: int) -> str:
    return f"maxsim_{r_c}"


def point_id(item_id) -> str:
    """The Qdrant point id of an item id: a UUID, distinct for 1 and "1". It is
    `str(uuid.uuid5(namespace, "<type>:<id>"))` written out (SHA-1, then the version and variant bits): without
    the `uuid.UUID` object in between it takes 2.5x less time, which an ingest pays per item."""
    digest = bytearray(hashlib.sha1(_ID_NAMESPACE.bytes + f"{type(item_id).__name__}:{item_id}".encode()).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def check_multivector_cap(r_c: int, dim: int) -> None:
    """ValueError when r_c vectors of `dim` floats exceed Qdrant's per-point multivector cap."""
    if r_c * dim > MULTIVECTOR_FLOAT_CAP:
        raise ValueError(
            f"candidate budget r_c={r_c} at dimension {dim} is {r_c * dim:,} floats per point: Qdrant caps a "
            f"multivector at {MULTIVECTOR_FLOAT_CAP:,} (at most {MULTIVECTOR_FLOAT_CAP // dim} vectors of this size)"
        )


# ---------------------------------------------------------------------------------------------------- engines
class Edge:
    """Qdrant's engine in this process (`pip install qdrant-edge-py`): each collection is one shard, the folder
    `folder/<name>`, with our metadata beside it in `<name>.metaembed.json` (shards have no collection metadata).

    Args:
        folder: where the shards live.
        indexing_threshold_kb: segments larger than this are optimized (HNSW on "coarse", quantized MaxSim
            fields) by `QdrantMetaEmbedIndex.optimize`; None keeps Qdrant's default.
    """

    def __init__(self, folder, indexing_threshold_kb: int | None = None):
        self.folder = Path(folder)
        self.indexing_threshold_kb = indexing_threshold_kb
        self._shards: dict = {}

    def collection_exists(self, name: str) -> bool:
        return (self.folder / name).is_dir() or self._metadata_path(name).is_file()

    def _metadata_path(self, name: str) -> Path:
        return self.folder / f"{name}.metaembed.json"

    def shard(self, name: str):
        if name not in self._shards:
            from qdrant_edge import EdgeShard

            self._shards[name] = EdgeShard.load(str(self.folder / name))
        return self._shards[name]

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()


def _edge():
    try:
        import qdrant_edge
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Qdrant's embedded engine needs qdrant-edge-py: pip install 'metaembed[qdrant]'") from error
    return qdrant_edge


def _client_models():
    try:
        from qdrant_client import models
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Qdrant support needs qdrant-client: pip install 'metaembed[qdrant]'") from error
    return models


class _Backend:
    """What both backends do alike; each translates a field, a request and a search into its engine's own types."""

    def create(self, fields: dict, metadata: dict, on_disk: bool) -> None:
        """`fields`: {name: (dim, multivector, quantization or None, datatype)}."""
        vectors = {field: self.vector_params(*spec, on_disk) for field, spec in fields.items()}
        self.create_collection(vectors, metadata, fields)

    def query(self, requests: list) -> list:
        """[[(score, id), ...] per request]; a request is {"vector", "using", "limit", "prefetch": None or (vector,
        using, limit, exact), "rescore": None or bool, "oversampling"}."""
        built = []
        for r in requests:
            prefetch = None if r["prefetch"] is None else self.prefetch(*r["prefetch"])
            params = None if r["rescore"] is None else self.rescore_params(r["rescore"], r["oversampling"])
            built.append(self.request(r["vector"], r["using"], r["limit"], prefetch, params))
        return self.run_queries(built)


class _ClientBackend(_Backend):
    """A collection reached through qdrant-client (a server by URL, or local mode)."""

    def __init__(self, client, name: str):
        self.client, self.name = client, name

    def exists(self) -> bool:
        return self.client.collection_exists(self.name)

    def vector_params(self, dim: int, multivector: bool, quantization, datatype: str, on_disk: bool):
        models = _client_models()
        extra = {"datatype": models.Datatype.FLOAT16} if datatype == "float16" else {}  # local mode stores float32
        if multivector:
            comparator = models.MultiVectorComparator.MAX_SIM
            extra["multivector_config"] = models.MultiVectorConfig(comparator=comparator)
            extra["hnsw_config"] = models.HnswConfigDiff(m=0)
        if quantization == "int8":
            extra["quantization_config"] = models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True)
            )
        elif quantization == "binary":
            extra["quantization_config"] = models.BinaryQuantization(
                binary=models.BinaryQuantizationConfig(always_ram=True)
            )
        return models.VectorParams(size=dim, distance=models.Distance.DOT, on_disk=on_disk, **extra)

    def create_collection(self, vectors: dict, metadata: dict, fields: dict) -> None:
        self.client.create_collection(self.name, vectors_config=vectors, metadata=metadata)

    def metadata_and_fields(self) -> tuple:
        info = self.client.get_collection(self.name)
        fields = info.config.params.vectors
        return info.config.metadata or {}, set(fields) if isinstance(fields, dict) else fields

    def write(self, point_ids: list, vectors: np.ndarray, payloads: list, budgets: tuple) -> None:
        """Upsert one batch: `vectors` [n, max(budgets), D] float32. The fields are views of it, handed to the
        client's batch upload as numpy arrays: its gRPC uploader sends their bytes; REST and local mode convert
        them to lists once, inside the client."""
        columns = {COARSE: vectors[:, 0]}
        columns.update({maxsim_field(r_c): vectors[:, :r_c] for r_c in budgets if r_c > 1})
        self.client.upload_collection(
            self.name, vectors=columns, payload=payloads, ids=point_ids, batch_size=len(point_ids), wait=True
        )

    def existing(self, point_ids: list) -> set:
        found = self.client.retrieve(self.name, point_ids, with_payload=False, with_vectors=False)
        return {str(point.id) for point in found}

    def count(self) -> int:
        return self.client.count(self.name, exact=True).count

    def optimize(self) -> None:
        pass  # a server optimizes in the background; local mode has no optimizer

    def prefetch(self, vector, using: str, limit: int, exact: bool):
        models = _client_models()
        return models.Prefetch(query=vector, using=using, limit=limit, params=models.SearchParams(exact=exact))

    def rescore_params(self, rescore: bool, oversampling):
        models = _client_models()
        quantization = models.QuantizationSearchParams(rescore=rescore, oversampling=oversampling)
        return models.SearchParams(quantization=quantization)

    def request(self, vector, using: str, limit: int, prefetch, params):
        return _client_models().QueryRequest(
            query=vector, using=using, limit=limit, prefetch=prefetch, params=params, with_payload=[ID_KEY]
        )

    def run_queries(self, built: list) -> list:
        responses = self.client.query_batch_points(self.name, requests=built)
        return [[(point.score, point.payload[ID_KEY]) for point in response.points] for response in responses]


class _EdgeBackend(_Backend):
    """A shard of Qdrant's embedded engine (`Edge`)."""

    def __init__(self, edge: Edge, name: str):
        self.edge, self.name = edge, name

    def exists(self) -> bool:
        return self.edge.collection_exists(self.name)

    def vector_params(self, dim: int, multivector: bool, quantization, datatype: str, on_disk: bool):
        qe = _edge()
        extra = {"datatype": qe.VectorStorageDatatype.Float16} if datatype == "float16" else {}
        if multivector:
            hnsw = qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000)  # re-rank only: no graph
            extra["multivector_config"] = qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim)
            extra["hnsw_config"] = hnsw
        if quantization == "int8":
            extra["quantization_config"] = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, always_ram=True)
        elif quantization == "binary":
            extra["quantization_config"] = qe.BinaryQuantizationConfig(always_ram=True)
        return qe.EdgeVectorParams(size=dim, distance=qe.Distance.Dot, on_disk=on_disk, **extra)

    def create_collection(self, vectors: dict, metadata: dict, fields: dict) -> None:
        qe = _edge()
        optimizers = None
        if self.edge.indexing_threshold_kb is not None:
            optimizers = qe.EdgeOptimizersConfig(indexing_threshold=self.edge.indexing_threshold_kb)
        self.edge.folder.mkdir(parents=True, exist_ok=True)
        config = qe.EdgeConfig(vectors=vectors, optimizers=optimizers)
        shard = qe.EdgeShard.create(str(self.edge.folder / self.name), config)
        self.edge._shards[self.name] = shard
        # Written last: a collection without it is an interrupted creation, refused by `open`.
        write_atomic(self.edge._metadata_path(self.name), json.dumps({**metadata, "fields": sorted(fields)}))

    def metadata_and_fields(self) -> tuple:
        path = self.edge._metadata_path(self.name)
        if not path.is_file() or not (self.edge.folder / self.name).is_dir():
            return {}, set()
        metadata = json.loads(path.read_text(encoding="utf-8"))
        return metadata, set(metadata.pop("fields", []))

    def write(self, point_ids: list, vectors: np.ndarray, payloads: list, budgets: tuple) -> None:
        """Upsert one batch in one engine operation. The engine reads a vector as a Python sequence of floats (it
        takes no numpy arrays); each stored row is handed over as a memoryview of the batch's float32 bytes, which
        the engine reads float by float without a list of Python floats made first (2x faster than
        `ndarray.tolist()` here), and every field is a prefix of the same rows."""
        qe = _edge()
        fields = [(maxsim_field(r_c), r_c) for r_c in budgets if r_c > 1]
        batch = np.ascontiguousarray(vectors, dtype=np.float32)
        largest, dim = batch.shape[1], batch.shape[2]
        flat = memoryview(batch.reshape(-1))
        rows = [flat[start : start + dim] for start in range(0, batch.size, dim)]
        points = []
        for number, (pid, payload) in enumerate(zip(point_ids, payloads)):
            first = number * largest
            vector = {COARSE: rows[first], **{name: rows[first : first + r_c] for name, r_c in fields}}
            points.append(qe.Point(pid, vector, payload))
        self.edge.shard(self.name).update(qe.UpdateOperation.upsert_points(points))

    def existing(self, point_ids: list) -> set:
        return {str(record.id) for record in self.edge.shard(self.name).retrieve(point_ids, False, False)}

    def count(self) -> int:
        return self.edge.shard(self.name).count(_edge().CountRequest(exact=True))

    def optimize(self) -> None:
        self.edge.shard(self.name).optimize()

    def prefetch(self, vector, using: str, limit: int, exact: bool):
        qe = _edge()
        return [
            qe.Prefetch(limit=limit, query=qe.Query.Nearest(vector, using=using), params=qe.SearchParams(exact=exact))
        ]

    def rescore_params(self, rescore: bool, oversampling):
        qe = _edge()
        return qe.SearchParams(quantization=qe.QuantizationSearchParams(rescore=rescore, oversampling=oversampling))

    def request(self, vector, using: str, limit: int, prefetch, params):
        qe = _edge()
        return qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(vector, using=using),
            prefetches=prefetch,
            params=params,
            with_payload=[ID_KEY],
        )

    def run_queries(self, built: list) -> list:
        responses = self.edge.shard(self.name).query_batch(_edge().QueryBatchRequest(built))
        return [[(point.score, point.payload[ID_KEY]) for point in points] for points in responses]


def _backend(client, name: str):
    return _EdgeBackend(client, name) if isinstance(client, Edge) else _ClientBackend(client, name)


# ---------------------------------------------------------------------------------------------------- the index
class QdrantMetaEmbedIndex:
    """A MetaEmbed index stored in a Qdrant collection. Create one with `create`, reopen it with `open`.

    Args:
        client: a `qdrant_client.QdrantClient` (a server, or local mode) or an `Edge` (Qdrant's engine in-process).
        collection_name: the collection holding the items.
    """

    def __init__(
        self,
        client,
        collection_name: str,
        dim: int,
        candidate_budgets: tuple,
        quantization=None,
        datatype: str = "float32",
    ):
        self.client, self.collection_name = client, collection_name
        self.dim, self.candidate_budgets, self.quantization = dim, tuple(candidate_budgets), quantization
        self.datatype = datatype
        self._backend = _backend(client, collection_name)

    # ------------------------------------------------------------------------------------------------ setup
    @classmethod
    def create(
        cls,
        client,
        collection_name: str,
        dim: int,
        candidate_budgets=(64,),
        on_disk: bool = False,
        quantization: str | None = None,
        datatype: str = "float32",
    ):
        """A new collection for `dim`-dimensional items searchable at the candidate budgets `candidate_budgets`
        (each stored as its own MaxSim field; r_c = 1 needs none: it is the "coarse" field). `quantization`
        ("int8": Qdrant's scalar quantization, "binary": its binary quantization) compresses the MaxSim fields;
        searches then score the compressed vectors and re-score with the originals (`search(rescore=...)`).
        `datatype="float16"` stores every field in Qdrant's float16 (half the bytes; local mode ignores it): a
        score moves by at most r_q * 2^-10 for unit vectors, and an embeddings folder written in float16 or
        bfloat16 loses nothing more (bfloat16 converts exactly, but for magnitudes below 6.1e-5: 3e-8 at most)."""
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        budgets = tuple(candidate_budgets)
        if not budgets or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in budgets):
            raise ValueError(f"candidate_budgets must be positive integers, got {candidate_budgets!r}")
        if quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be None or one of {QUANTIZATIONS}, got {quantization!r}")
        if datatype not in DATATYPES:
            raise ValueError(f"datatype must be one of {DATATYPES}, got {datatype!r}")
        budgets = tuple(sorted(set(budgets)))
        for r_c in budgets:
            check_multivector_cap(r_c, dim)
        backend = _backend(client, collection_name)
        if backend.exists():
            raise ValueError(f"collection {collection_name!r} already exists: open it with QdrantMetaEmbedIndex.open")
        fields = {COARSE: (dim, False, None, datatype)}
        fields.update({maxsim_field(r_c): (dim, True, quantization, datatype) for r_c in budgets if r_c > 1})
        metadata = {
            "format": FORMAT,
            "dim": dim,
            "candidate_budgets": list(budgets),
            "quantization": quantization,
            "datatype": datatype,
        }
        backend.create(fields, metadata, on_disk)
        return cls(client, collection_name, dim, budgets, quantization, datatype)

    @staticmethod
    def exists(client, collection_name: str) -> bool:
        """Whether `client` holds a collection of this name (written by `create` or not: `open` checks that)."""
        return _backend(client, collection_name).exists()

    @classmethod
    def open(cls, client, collection_name: str):
        """An existing collection written by `create`, checked to be one."""
        backend = _backend(client, collection_name)
        if not backend.exists():
            raise ValueError(f"collection {collection_name!r} does not exist")
        metadata, fields = backend.metadata_and_fields()
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"collection {collection_name!r} was not written by QdrantMetaEmbedIndex "
                f"(format {metadata.get('format')!r}, expected {FORMAT!r})"
            )
        dim, budgets = metadata["dim"], tuple(metadata["candidate_budgets"])
        expected = {COARSE} | {maxsim_field(r_c) for r_c in budgets if r_c > 1}
        if not isinstance(fields, set) or fields != expected:
            found = sorted(fields) if isinstance(fields, set) else fields
            raise ValueError(f"collection {collection_name!r} has vector fields {found}, expected {sorted(expected)}")
        datatype = metadata.get("datatype", "float32")  # collections written before the option: float32
        return cls(client, collection_name, dim, budgets, metadata.get("quantization"), datatype)

    def __len__(self) -> int:
        return self._backend.count()

    def __repr__(self) -> str:
        return (
            f"QdrantMetaEmbedIndex({self.collection_name!r}, {self.dim} dims, "
            f"candidate budgets {self.candidate_budgets}, quantization {self.quantization}, {self.datatype})"
        )

    def optimize(self) -> None:
        """Let the engine build what it builds after writes (HNSW, quantized vectors): the embedded engine does it
        now, blocking; a server does it by itself in the background; local mode has nothing to build."""
        self._backend.optimize()

    # ------------------------------------------------------------------------------------------------ writing
    def add(self, embeddings: torch.Tensor, ids: list, batch_size: int = 256, show_progress_bar: bool = False):
        """Upsert items: `embeddings` [N, R, D] with R >= the largest candidate budget, `ids` one per item (str or
        int, kept in the payload under "metaembed_id"). An item whose id is already stored is replaced. Every item
        is checked before any is written."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 3:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings must be a tensor of shape (items, vectors, dim), got {shape}")
        count = embeddings.shape[0]
        ids = list(ids)
        if len(ids) != count:
            raise ValueError(f"got {len(ids)} ids for {count} items: give one id per item")
        self._check_items(embeddings, ids, "", set())

        from tqdm.auto import tqdm

        largest = max(self.candidate_budgets)
        with tqdm(total=count, desc="Upserting", unit="item", disable=not show_progress_bar) as progress:
            for start in range(0, count, batch_size):
                chunk = embeddings[start : start + batch_size, :largest].detach().to("cpu", torch.float32)
                self._write(chunk.numpy(), ids[start : start + batch_size])
                progress.update(chunk.shape[0])

    def add_from_embeddings(
        self, path, batch_size: int = 256, skip_existing: bool = False, show_progress_bar: bool = False
    ) -> dict:
        """Upsert every item of a candidate embeddings folder (what `metaembed encode` and `save_embeddings` write),
        shard by shard: one shard in memory at a time, sent in batches of `batch_size` by the engine's batch write.
        Only the first max(candidate_budgets) vectors of an item are read into the batch. Returns
        {"added": items written, "skipped": items left as stored}.

        A shard with a bad item (non-finite values, a bad or repeated id, a value float16 cannot hold) is refused
        with a ValueError naming the shard file and the item; the shards before it are already written. Re-running
        after an interruption or a fix is safe: point ids derive from item ids, so an item written again replaces
        itself. `skip_existing=True` makes that re-run cheaper: items whose id is already in the collection are not
        converted or sent again (it trusts that a stored id holds the same vectors)."""
        from tqdm.auto import tqdm

        from .embeddings_file import embeddings_info, iter_embedding_shards

        path = Path(path)
        info = embeddings_info(path)
        largest = max(self.candidate_budgets)
        holder = f"collection {self.collection_name!r}"
        if info.get("role") != "candidate":
            raise ValueError(f"{path}: holds {info.get('role')} embeddings, expected candidate embeddings")
        if info["dim"] != self.dim:
            raise ValueError(f"{path}: embeddings of dimension {info['dim']}, but {holder} holds dimension {self.dim}")
        if info["num_vectors"] < largest:
            raise ValueError(
                f"{path}: {info['num_vectors']} vectors per item, but {holder} stores candidate budgets up to "
                f"r_c={largest} ({self.candidate_budgets})"
            )
        counts = {"added": 0, "skipped": 0}
        seen = set()
        try:
            with tqdm(total=info["count"], desc="Upserting", unit="item", disable=not show_progress_bar) as progress:
                for shard, embeddings, ids in iter_embedding_shards(path):  # ValueError naming an unreadable shard
                    self._check_items(embeddings, ids, f"{path / shard}: ", seen)
                    vectors = embeddings[:, :largest].numpy()
                    for start in range(0, len(ids), batch_size):
                        part, part_ids = vectors[start : start + batch_size], ids[start : start + batch_size]
                        if skip_existing:
                            present = self._backend.existing([point_id(i) for i in part_ids])
                            keep = [row for row, i in enumerate(part_ids) if point_id(i) not in present]
                            counts["skipped"] += len(part_ids) - len(keep)
                            part, part_ids = part[keep], [part_ids[row] for row in keep]
                        if part_ids:
                            self._write(part, part_ids)
                            counts["added"] += len(part_ids)
                        progress.update(min(batch_size, len(ids) - start))
        except ValueError as error:
            done = counts["added"] + counts["skipped"]
            if done:
                raise ValueError(
                    f"{error} (the {done:,} items before it are in {holder}: fix the input and run again; an "
                    f"item added again replaces itself)"
                ) from error
            raise
        return counts

    def _check_items(self, embeddings: torch.Tensor, ids: list, where: str, seen: set) -> None:
        """ValueError starting with `where` and naming the item, unless every item can be stored: D = dim, enough
        vectors, finite values (and within float16's range when stored as float16) in the vectors kept, ids str or
        int and not in `seen` (which they join)."""
        largest, holder = max(self.candidate_budgets), f"this collection (budgets {self.candidate_budgets})"
        _, vectors, found = embeddings.shape
        if found != self.dim:
            raise ValueError(f"{where}embeddings have dimension {found} but {holder} holds dimension {self.dim}")
        if vectors < largest:
            raise ValueError(f"{where}embeddings have {vectors} vectors per item but {holder} keeps {largest}")
        if not embeddings.is_floating_point():
            raise ValueError(f"{where}embeddings must be floating point, got {embeddings.dtype}")
        for row, item_id in enumerate(ids):
            if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
                raise ValueError(f"{where}id at position {row} must be a str or an int, got {item_id!r}")
            if item_id in seen:
                raise ValueError(f"{where}id {item_id!r} appears more than once (again at position {row})")
            seen.add(item_id)
        kept = embeddings[:, :largest].detach()
        if not kept.numel():
            return
        low, high = torch.aminmax(kept)  # one pass; NaN and inf show in the extremes, then the item is looked for
        if not (torch.isfinite(low) and torch.isfinite(high)):
            finite = torch.isfinite(kept).flatten(1).all(dim=1)
            row = int((~finite).nonzero()[0])
            raise ValueError(f"{where}item {ids[row]!r} (position {row}) has non-finite values (NaN or inf)")
        if self.datatype == "float16" and max(-float(low), float(high)) > FLOAT16_MAX:
            magnitudes = kept.abs().flatten(1).amax(dim=1)
            row = int((magnitudes > FLOAT16_MAX).nonzero()[0])
            raise ValueError(
                f"{where}item {ids[row]!r} (position {row}) has a value of magnitude {float(magnitudes[row]):.6g}: "
                f"{self.collection_name!r} stores float16, whose largest is 65504 (create it with datatype='float32')"
            )

    def _write(self, vectors: np.ndarray, ids: list) -> None:
        """One batch, checked: `vectors` [n, max(budgets), D] float32."""
        payloads = [{ID_KEY: item_id} for item_id in ids]
        self._backend.write([point_id(i) for i in ids], vectors, payloads, self.candidate_budgets)

    @classmethod
    def from_index(
        cls,
        index,
        client,
        collection_name: str,
        candidate_budgets=None,
        batch_size: int = 256,
        show_progress_bar: bool = False,
        quantization: str | None = None,
    ):
        """A new collection holding every item of a `MetaEmbedIndex` (by default at its stored budget; a compressed
        index gives its full vectors)."""
        budgets = candidate_budgets or (index.num_vectors,)
        store = cls.create(client, collection_name, index.dim, budgets, quantization=quantization)
        for vectors, ids in index.chunks(4096):  # [R_c, n, D] views, segment by segment: never the whole index
            store.add(vectors.transpose(0, 1), ids, batch_size=batch_size, show_progress_bar=show_progress_bar)
        return store

    # ------------------------------------------------------------------------------------------------ search
    def search(
        self,
        queries: torch.Tensor,
        budget: tuple | None = None,
        k: int = 10,
        shortlist: int | None = None,
        exact: bool = False,
        rescore: bool = True,
        oversampling: float | None = None,
    ) -> SearchResult:
        """Top-k by MaxSim at `budget` = (r_q, r_c), r_c one of `candidate_budgets` (default: the largest).

        With `shortlist`, Qdrant first keeps the `shortlist` best items by vector 0 (the "coarse" field; HNSW on a
        server or the embedded engine once optimized, unless `exact=True`; always exact in local mode), then
        re-ranks them by MaxSim. Without, every item is scored by MaxSim. In a quantized collection the MaxSim stage
        scores the compressed vectors; `rescore` re-scores its best `k * oversampling` with the originals (local
        mode ignores quantization and is always exact). Returns a `SearchResult` whose `positions` is None
        (Qdrant has no row order)."""
        queries = as_query_batch(queries, self.dim, "this collection")
        largest = max(self.candidate_budgets)
        r_q, r_c = check_budget(
            budget or (queries.shape[1], largest), (queries.shape[1], largest), what="queries and the collection"
        )
        if r_c not in self.candidate_budgets and r_c != 1:
            raise ValueError(
                f"candidate budget r_c={r_c} is not stored in collection {self.collection_name!r}: "
                f"it holds {self.candidate_budgets} (choose them when creating the collection)"
            )
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if shortlist is not None and (not isinstance(shortlist, int) or isinstance(shortlist, bool) or shortlist < k):
            raise ValueError(f"shortlist must be an integer of at least k={k}, got {shortlist!r}")
        if oversampling is not None and not (isinstance(oversampling, (int, float)) and oversampling >= 1):
            raise ValueError(f"oversampling must be a number of at least 1, got {oversampling!r}")
        size = len(self)
        if size == 0:
            raise ValueError(f"collection {self.collection_name!r} is empty: add items before searching")
        if k > size:
            raise ValueError(f"k must be an integer in 1..{size} (the number of items), got {k}")

        queries = queries[:, :r_q].detach().float().cpu()
        quantized = self.quantization is not None and r_c > 1
        requests = []
        for query in queries:
            if r_c == 1:  # sum_i max_j <q_i, c_j> over one c: <sum_i q_i, c_0>, a plain dense search
                vector, using = query.sum(dim=0).tolist(), COARSE
            else:
                vector, using = query.tolist(), maxsim_field(r_c)
            prefetch = None if shortlist is None else (query[0].tolist(), COARSE, shortlist, exact)
            requests.append(
                {
                    "vector": vector,
                    "using": using,
                    "limit": k,
                    "prefetch": prefetch,
                    "rescore": rescore if quantized else None,
                    "oversampling": oversampling,
                }
            )
        responses = self._backend.query(requests)
        scores = torch.tensor([[score for score, _ in response] for response in responses], dtype=torch.float32)
        ids = [[item_id for _, item_id in response] for response in responses]
        return SearchResult(scores=scores.reshape(len(responses), -1), positions=None, ids=ids)


__all__ = [
    "QdrantMetaEmbedIndex",
    "Edge",
    "point_id",
    "maxsim_field",
    "check_multivector_cap",
    "MULTIVECTOR_FLOAT_CAP",
    "DATATYPES",
]
