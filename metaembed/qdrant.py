"""MetaEmbed candidates in Qdrant: the serving path once an index outgrows one process.

`QdrantMetaEmbedIndex` writes each item as one Qdrant point with named vectors:

    "coarse"        vector 0 of the item (a plain dense vector, HNSW-indexed): the budget-(1, 1) embedding
    "maxsim_<r_c>"  the item's first r_c vectors as a multivector compared with MAX_SIM, one field per candidate
                    budget chosen at creation (HNSW off: these fields only re-rank)

and searches in Qdrant's own query engine: a prefetch on "coarse" with the query's first vector shortlists
candidates, then MaxSim on "maxsim_<r_c>" with the query's first r_q vectors re-ranks them, which is
`MetaEmbedIndex.search_two_stage` run by the database. Without a shortlist the MaxSim field is scanned in full
(`MetaEmbedIndex.search`). The query side's budget r_q is free at search time; r_c is one of the fields created.

The same code runs on Qdrant's embedded local mode (`QdrantClient(":memory:")` or `QdrantClient(path=...)`, the
default in tests and examples) and on a Qdrant server or cluster (`QdrantClient(url=...)`). Point ids are UUIDs
derived from the item ids (kept in the payload), so re-adding an item replaces it: an interrupted upload can be
re-run from the start.
"""

import uuid

import torch

from metaembed.index import SearchResult, as_query_batch, check_candidate_embeddings
from modeling_metaembed.scoring_metaembed import check_budget

FORMAT = "metaembed-qdrant/1"
COARSE = "coarse"
ID_KEY = "metaembed_id"
_ID_NAMESPACE = uuid.UUID("6f1d4b52-3b1e-4c38-9a5e-2f6d0c1a7e90")


def _models():
    try:
        from qdrant_client import models
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Qdrant support needs qdrant-client: pip install 'metaembed[qdrant]'") from error
    return models


def maxsim_field(r_c: int) -> str:
    return f"maxsim_{r_c}"


def point_id(item_id) -> str:
    """The Qdrant point id of an item id: a UUID, distinct for 1 and "1"."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{type(item_id).__name__}:{item_id}"))


class QdrantMetaEmbedIndex:
    """A MetaEmbed index stored in a Qdrant collection. Create one with `create`, reopen it with `open`.

    Args:
        client: a `qdrant_client.QdrantClient` (local mode or a server).
        collection_name: the collection holding the items.
    """

    def __init__(self, client, collection_name: str, dim: int, candidate_budgets: tuple):
        self.client, self.collection_name = client, collection_name
        self.dim, self.candidate_budgets = dim, tuple(candidate_budgets)

    # ------------------------------------------------------------------------------------------------ setup
    @classmethod
    def create(cls, client, collection_name: str, dim: int, candidate_budgets=(64,), on_disk: bool = False):
        """A new collection for `dim`-dimensional items searchable at the candidate budgets `candidate_budgets`
        (each stored as its own MaxSim field; r_c = 1 needs none: it is the "coarse" field)."""
        models = _models()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        budgets = tuple(candidate_budgets)
        if not budgets or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in budgets):
            raise ValueError(f"candidate_budgets must be positive integers, got {candidate_budgets!r}")
        budgets = tuple(sorted(set(budgets)))
        if client.collection_exists(collection_name):
            raise ValueError(f"collection {collection_name!r} already exists: open it with QdrantMetaEmbedIndex.open")
        vectors = {COARSE: models.VectorParams(size=dim, distance=models.Distance.DOT, on_disk=on_disk)}
        for r_c in budgets:
            if r_c > 1:
                vectors[maxsim_field(r_c)] = models.VectorParams(
                    size=dim,
                    distance=models.Distance.DOT,
                    on_disk=on_disk,
                    multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
                    hnsw_config=models.HnswConfigDiff(m=0),  # re-rank only: no graph to build
                )
        metadata = {"format": FORMAT, "dim": dim, "candidate_budgets": list(budgets)}
        client.create_collection(collection_name, vectors_config=vectors, metadata=metadata)
        return cls(client, collection_name, dim, budgets)

    @classmethod
    def open(cls, client, collection_name: str):
        """An existing collection written by `create`, checked to be one."""
        if not client.collection_exists(collection_name):
            raise ValueError(f"collection {collection_name!r} does not exist")
        info = client.get_collection(collection_name)
        metadata = info.config.metadata or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"collection {collection_name!r} was not written by QdrantMetaEmbedIndex "
                f"(format {metadata.get('format')!r}, expected {FORMAT!r})"
            )
        dim, budgets = metadata["dim"], tuple(metadata["candidate_budgets"])
        fields = info.config.params.vectors
        expected = {COARSE} | {maxsim_field(r_c) for r_c in budgets if r_c > 1}
        if not isinstance(fields, dict) or set(fields) != expected:
            found = sorted(fields) if isinstance(fields, dict) else fields
            raise ValueError(f"collection {collection_name!r} has vector fields {found}, expected {sorted(expected)}")
        return cls(client, collection_name, dim, budgets)

    def __len__(self) -> int:
        return self.client.count(self.collection_name, exact=True).count

    def __repr__(self) -> str:
        return (f"QdrantMetaEmbedIndex({self.collection_name!r}, {self.dim} dims, "
                f"candidate budgets {self.candidate_budgets})")  # fmt: skip

    # ------------------------------------------------------------------------------------------------ writing
    def add(self, embeddings: torch.Tensor, ids: list, batch_size: int = 256, show_progress_bar: bool = False):
        """Upsert items: `embeddings` [N, R, D] with R >= the largest candidate budget, `ids` one per item (str or
        int, kept in the payload under "metaembed_id"). An item whose id is already stored is replaced."""
        models = _models()
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

        embeddings = embeddings.detach().float().cpu()
        with tqdm(total=count, desc="Upserting", unit="item", disable=not show_progress_bar) as progress:
            for start in range(0, count, batch_size):
                points = []
                for item_id, item in zip(ids[start : start + batch_size], embeddings[start : start + batch_size]):
                    vector = {COARSE: item[0].tolist()}
                    for r_c in self.candidate_budgets:
                        if r_c > 1:
                            vector[maxsim_field(r_c)] = item[:r_c].tolist()
                    points.append(models.PointStruct(id=point_id(item_id), vector=vector, payload={ID_KEY: item_id}))
                self.client.upsert(self.collection_name, points=points, wait=True)
                progress.update(len(points))

    @classmethod
    def from_index(cls, index, client, collection_name: str, candidate_budgets=None, batch_size: int = 256,
                   show_progress_bar: bool = False):  # fmt: skip
        """A new collection holding every item of a `MetaEmbedIndex` (by default at its stored budget)."""
        budgets = candidate_budgets or (index.num_vectors,)
        store = cls.create(client, collection_name, index.dim, budgets)
        vectors = index.vectors  # [R_c, N, D]
        for start in range(0, len(index), 4096):
            chunk = vectors[:, start : start + 4096].transpose(0, 1)  # [n, R_c, D]
            store.add(chunk, index.ids[start : start + 4096], batch_size=batch_size,
                      show_progress_bar=show_progress_bar)  # fmt: skip
        return store

    # ------------------------------------------------------------------------------------------------ search
    def search(self, queries: torch.Tensor, budget: tuple | None = None, k: int = 10, shortlist: int | None = None,
               exact: bool = False) -> SearchResult:  # fmt: skip
        """Top-k by MaxSim at `budget` = (r_q, r_c), r_c one of `candidate_budgets` (default: the largest).

        With `shortlist`, Qdrant first keeps the `shortlist` best items by vector 0 (the "coarse" field; HNSW on a
        server unless `exact=True`, always exact in local mode), then re-ranks them by MaxSim. Without, every item
        is scored by MaxSim. Returns a `SearchResult` whose `positions` is None (Qdrant has no row order)."""
        models = _models()
        queries = as_query_batch(queries, self.dim, "this collection")
        largest = max(self.candidate_budgets)
        r_q, r_c = check_budget(budget or (queries.shape[1], largest), (queries.shape[1], largest),
                                what="queries and the collection")  # fmt: skip
        if r_c not in self.candidate_budgets and r_c != 1:
            raise ValueError(
                f"candidate budget r_c={r_c} is not stored in collection {self.collection_name!r}: "
                f"it holds {self.candidate_budgets} (choose them when creating the collection)"
            )
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if shortlist is not None and (not isinstance(shortlist, int) or isinstance(shortlist, bool) or shortlist < k):
            raise ValueError(f"shortlist must be an integer of at least k={k}, got {shortlist!r}")
        size = len(self)
        if size == 0:
            raise ValueError(f"collection {self.collection_name!r} is empty: add items before searching")
        if k > size:
            raise ValueError(f"k must be an integer in 1..{size} (the number of items), got {k}")

        queries = queries[:, :r_q].detach().float().cpu()
        requests = []
        for query in queries:
            if r_c == 1:  # sum_i max_j <q_i, c_j> over one c: <sum_i q_i, c_0>, a plain dense search
                vector, using = query.sum(dim=0).tolist(), COARSE
            else:
                vector, using = query.tolist(), maxsim_field(r_c)
            prefetch = None
            if shortlist is not None:
                prefetch = models.Prefetch(query=query[0].tolist(), using=COARSE, limit=shortlist,
                                           params=models.SearchParams(exact=exact))  # fmt: skip
            requests.append(models.QueryRequest(query=vector, using=using, limit=k, prefetch=prefetch,
                                                with_payload=[ID_KEY]))  # fmt: skip
        responses = self.client.query_batch_points(self.collection_name, requests=requests)
        scores = torch.tensor([[point.score for point in response.points] for response in responses])
        ids = [[point.payload[ID_KEY] for point in response.points] for response in responses]
        return SearchResult(scores=scores.float(), positions=None, ids=ids)


__all__ = ["QdrantMetaEmbedIndex", "point_id", "maxsim_field"]
