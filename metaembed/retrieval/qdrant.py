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

Two engines, one code path: everything above is written once against a small backend (create, upsert, count,
query), implemented for `qdrant_client.QdrantClient` (a server or cluster by URL, or its Python local mode,
`QdrantClient(":memory:")` / `QdrantClient(path=...)`) and for `Edge`, Qdrant's own Rust engine running in this
process (`qdrant-edge-py`: the server's segment code, HNSW, MAX_SIM and quantization, without a server). Point ids
are UUIDs derived from the item ids (kept in the payload), so re-adding an item replaces it: an interrupted upload
can be re-run from the start.
"""

import json
import uuid
from pathlib import Path

import torch

from modeling_metaembed.hub_metaembed import write_atomic
from modeling_metaembed.scoring_metaembed import check_budget

from .index import SearchResult, as_query_batch, check_candidate_embeddings

FORMAT = "metaembed-qdrant/1"
COARSE = "coarse"
ID_KEY = "metaembed_id"
QUANTIZATIONS = ("int8", "binary")
# Qdrant caps one point's multivector at this many floats in total (r_c * dim); the embedded engine does not check
# it, a server rejects the point: we refuse such a field when the collection is created.
MULTIVECTOR_FLOAT_CAP = 1_048_576
_ID_NAMESPACE = uuid.UUID("6f1d4b52-3b1e-4c38-9a5e-2f6d0c1a7e90")


def maxsim_field(r_c: int) -> str:
    return f"maxsim_{r_c}"


def point_id(item_id) -> str:
    """The Qdrant point id of an item id: a UUID, distinct for 1 and "1"."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{type(item_id).__name__}:{item_id}"))


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
        """`fields`: {name: (dim, multivector, quantization or None)}."""
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

    def vector_params(self, dim: int, multivector: bool, quantization, on_disk: bool):
        models = _client_models()
        extra = {}
        if multivector:
            comparator = models.MultiVectorComparator.MAX_SIM
            extra = {
                "multivector_config": models.MultiVectorConfig(comparator=comparator),
                "hnsw_config": models.HnswConfigDiff(m=0),
            }
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

    def upsert(self, points: list) -> None:
        models = _client_models()
        structs = [models.PointStruct(id=pid, vector=vector, payload=payload) for pid, vector, payload in points]
        self.client.upsert(self.name, points=structs, wait=True)

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

    def vector_params(self, dim: int, multivector: bool, quantization, on_disk: bool):
        qe = _edge()
        extra = {}
        if multivector:
            hnsw = qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000)  # re-rank only: no graph
            multivector = qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim)
            extra = {"multivector_config": multivector, "hnsw_config": hnsw}
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

    def upsert(self, points: list) -> None:
        qe = _edge()
        shard = self.edge.shard(self.name)
        built = [qe.Point(pid, vector, payload) for pid, vector, payload in points]
        shard.update(qe.UpdateOperation.upsert_points(built))

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

    def __init__(self, client, collection_name: str, dim: int, candidate_budgets: tuple, quantization=None):
        self.client, self.collection_name = client, collection_name
        self.dim, self.candidate_budgets, self.quantization = dim, tuple(candidate_budgets), quantization
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
    ):
        """A new collection for `dim`-dimensional items searchable at the candidate budgets `candidate_budgets`
        (each stored as its own MaxSim field; r_c = 1 needs none: it is the "coarse" field). `quantization`
        ("int8": Qdrant's scalar quantization, "binary": its binary quantization) compresses the MaxSim fields;
        searches then score the compressed vectors and re-score with the originals (`search(rescore=...)`)."""
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        budgets = tuple(candidate_budgets)
        if not budgets or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in budgets):
            raise ValueError(f"candidate_budgets must be positive integers, got {candidate_budgets!r}")
        if quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be None or one of {QUANTIZATIONS}, got {quantization!r}")
        budgets = tuple(sorted(set(budgets)))
        for r_c in budgets:
            check_multivector_cap(r_c, dim)
        backend = _backend(client, collection_name)
        if backend.exists():
            raise ValueError(f"collection {collection_name!r} already exists: open it with QdrantMetaEmbedIndex.open")
        fields = {COARSE: (dim, False, None)}
        fields.update({maxsim_field(r_c): (dim, True, quantization) for r_c in budgets if r_c > 1})
        metadata = {"format": FORMAT, "dim": dim, "candidate_budgets": list(budgets), "quantization": quantization}
        backend.create(fields, metadata, on_disk)
        return cls(client, collection_name, dim, budgets, quantization)

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
        return cls(client, collection_name, dim, budgets, metadata.get("quantization"))

    def __len__(self) -> int:
        return self._backend.count()

    def __repr__(self) -> str:
        return (
            f"QdrantMetaEmbedIndex({self.collection_name!r}, {self.dim} dims, "
            f"candidate budgets {self.candidate_budgets}, quantization {self.quantization})"
        )

    def optimize(self) -> None:
        """Let the engine build what it builds after writes (HNSW, quantized vectors): the embedded engine does it
        now, blocking; a server does it by itself in the background; local mode has nothing to build."""
        self._backend.optimize()

    # ------------------------------------------------------------------------------------------------ writing
    def add(self, embeddings: torch.Tensor, ids: list, batch_size: int = 256, show_progress_bar: bool = False):
        """Upsert items: `embeddings` [N, R, D] with R >= the largest candidate budget, `ids` one per item (str or
        int, kept in the payload under "metaembed_id"). An item whose id is already stored is replaced."""
        largest = max(self.candidate_budgets)
        check_candidate_embeddings(embeddings, self.dim, largest, f"this collection (budgets {self.candidate_budgets})")
        count = embeddings.shape[0]
        ids = list(ids)
        if len(ids) != count:
            raise ValueError(f"got {len(ids)} ids for {count} items: give one id per item")
        for position, item_id in enumerate(ids):
            if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
                raise ValueError(f"id at position {position} must be a str or an int, got {item_id!r}")
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"id {duplicate!r} appears more than once in this batch")

        from tqdm.auto import tqdm

        with tqdm(total=count, desc="Upserting", unit="item", disable=not show_progress_bar) as progress:
            for start in range(0, count, batch_size):
                chunk = embeddings[start : start + batch_size, :largest].detach().float().cpu()
                points = []
                for item_id, item in zip(ids[start : start + batch_size], chunk):
                    vector = {COARSE: item[0].tolist()}
                    for r_c in self.candidate_budgets:
                        if r_c > 1:
                            vector[maxsim_field(r_c)] = item[:r_c].tolist()
                    points.append((point_id(item_id), vector, {ID_KEY: item_id}))
                self._backend.upsert(points)
                progress.update(len(points))

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
        vectors = index.vectors  # [R_c, N, D]
        for start in range(0, len(index), 4096):
            chunk = vectors[:, start : start + 4096].transpose(0, 1)  # [n, R_c, D]
            store.add(
                chunk, index.ids[start : start + 4096], batch_size=batch_size, show_progress_bar=show_progress_bar
            )
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


__all__ = ["QdrantMetaEmbedIndex", "Edge", "point_id", "maxsim_field", "check_multivector_cap", "MULTIVECTOR_FLOAT_CAP"]
