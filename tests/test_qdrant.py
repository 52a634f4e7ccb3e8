"""QdrantMetaEmbedIndex on two engines through one code path: qdrant-client's local mode (Python) and Qdrant's own
Rust engine in-process (qdrant-edge-py). The same results as MetaEmbedIndex, persistence, quantization, bad input."""

import numpy as np
import pytest
import torch

pytest.importorskip("qdrant_client")  # declared test dependencies: these only guard odd environments
pytest.importorskip("qdrant_edge")
from qdrant_client import QdrantClient

from metaembed.retrieval.embeddings_file import save_embeddings
from metaembed.retrieval.index import MetaEmbedIndex
from metaembed.retrieval.qdrant import Edge, QdrantMetaEmbedIndex, point_id
from modeling_metaembed.scoring_metaembed import maxsim

ENGINES = ["local", "edge"]


def unit(*shape, seed=0):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(params=ENGINES)
def engine(request, tmp_path):
    """engine() -> a new client: qdrant-client local mode in memory, or the embedded engine in a folder (segments
    above 1 KB are optimized: HNSW on "coarse", quantized MaxSim fields)."""
    made = []

    def make(folder=None):
        client = (
            QdrantClient(":memory:")
            if request.param == "local"
            else Edge(folder or tmp_path / f"edge{len(made)}", indexing_threshold_kb=1)
        )
        made.append(client)
        return client

    make.name = request.param
    yield make
    for client in made:
        client.close()


@pytest.fixture
def pair(engine):
    """The same 120 items in a float32 MetaEmbedIndex and in a collection with candidate budgets 4 and 8."""
    index = MetaEmbedIndex(dim=16, num_vectors=8, dtype="float32")
    index.add(unit(120, 8, 16), ids=[f"doc-{i}" for i in range(120)])
    store = QdrantMetaEmbedIndex.from_index(index, engine(), "items", candidate_budgets=(4, 8))
    store.optimize()
    return index, store


@pytest.mark.parametrize("budget", [(4, 8), (2, 4), (1, 1), (4, 1), (1, 8)])
def test_exhaustive_search_equals_the_in_memory_index(pair, budget):
    index, store = pair
    queries = unit(6, 4, 16, seed=1)
    expected, found = index.search(queries, budget=budget, k=7), store.search(queries, budget=budget, k=7)
    assert found.ids == expected.ids
    torch.testing.assert_close(found.scores, expected.scores, rtol=1e-5, atol=1e-5)
    assert found.positions is None


@pytest.mark.parametrize("budget", [(4, 8), (2, 4), (3, 1)])
def test_prefetch_then_maxsim_equals_two_stage_search(pair, budget):
    index, store = pair
    queries = unit(6, 4, 16, seed=2)
    expected = index.search_two_stage(queries, budget=budget, k=5, shortlist=12)
    found = store.search(queries, budget=budget, k=5, shortlist=12, exact=True)
    assert found.ids == expected.ids
    torch.testing.assert_close(found.scores, expected.scores, rtol=1e-5, atol=1e-5)
    # The shortlist matters: with it, some results differ from the exhaustive ones.
    assert store.search(queries, budget=budget, k=5).ids != found.ids or budget[1] == 1


def test_model_embeddings_give_the_same_results(tiny_model, engine):
    model = tiny_model("qwen2_5_vl")
    texts = [f"item number {i} about topic {i % 5}" for i in range(24)]
    candidates = model.encode(texts, role="candidate", show_progress_bar=False)
    queries = model.encode(["topic 1", "item number 7"], role="query", show_progress_bar=False)
    r_c = candidates.shape[1]
    index = MetaEmbedIndex(dim=candidates.shape[-1], num_vectors=r_c, dtype="float32")
    index.add(candidates, ids=texts)
    store = QdrantMetaEmbedIndex.create(engine(), "texts", candidates.shape[-1], (r_c,))
    store.add(candidates, ids=texts)
    for budget in [(1, 1), (queries.shape[1], r_c)]:
        expected, found = index.search(queries, budget=budget, k=5), store.search(queries, budget=budget, k=5)
        # The index's hits but for the order of near ties: Qdrant sums in another float32 order, and at the full
        # budget two hits of "item number 7" are 9.5e-7 apart. So each hit's MaxSim must be the index's at its rank.
        positions = torch.tensor([[texts.index(i) for i in row] for row in found.ids])
        hits = maxsim(queries, candidates, budget=budget).gather(1, positions)
        torch.testing.assert_close(hits, expected.scores, rtol=0, atol=1e-5)
        assert all(len(set(row)) == 5 for row in found.ids)
        torch.testing.assert_close(found.scores, expected.scores, rtol=1e-5, atol=1e-5)


def test_a_collection_on_disk_reopens_with_the_same_results(tmp_path, engine):
    candidates, queries = unit(40, 4, 8), unit(3, 2, 8, seed=3)
    reach = (
        (lambda: QdrantClient(path=str(tmp_path / "qdrant")))
        if engine.name == "local"
        else (lambda: Edge(tmp_path / "edge"))
    )
    client = reach()
    store = QdrantMetaEmbedIndex.create(client, "items", dim=8, candidate_budgets=(2, 4))
    store.add(candidates, ids=list(range(40)))
    before = store.search(queries, budget=(2, 4), k=5)
    client.close()

    client = reach()
    reopened = QdrantMetaEmbedIndex.open(client, "items")
    assert (reopened.dim, reopened.candidate_budgets, len(reopened)) == (8, (2, 4), 40)
    after = reopened.search(queries, budget=(2, 4), k=5)
    assert after.ids == before.ids and all(isinstance(i, int) for i in after.ids[0])
    client.close()


def test_point_ids_are_the_uuid5_of_the_item_ids():
    """Collections written before keep their point ids: `point_id` is still uuid5 of "<type>:<id>"."""
    import uuid

    from metaembed.retrieval.qdrant import _ID_NAMESPACE

    for item_id in [0, 1, "1", "doc-7", "é 中", -5, 10**20, "", "x" * 500]:
        assert point_id(item_id) == str(uuid.uuid5(_ID_NAMESPACE, f"{type(item_id).__name__}:{item_id}"))


def test_re_adding_an_item_replaces_it(engine):
    store = QdrantMetaEmbedIndex.create(engine(), "items", dim=8, candidate_budgets=(4,))
    candidates = unit(10, 4, 8)
    store.add(candidates, ids=list(range(10)))
    store.add(candidates[:3].flip(0), ids=[0, 1, 2])  # an interrupted upload re-run, with new vectors for 0..2
    assert len(store) == 10
    top = store.search(candidates[0], budget=(4, 4), k=1)  # item 2 now holds item 0's old vectors
    assert top.ids == [[2]]
    assert point_id(1) != point_id("1")


@pytest.mark.parametrize("quantization, dim, oversampling, floor", [("int8", 32, 3.0, 0.9), ("binary", 64, 10.0, 0.6)])
def test_quantized_fields_are_searched_compressed_and_re_scored(engine, quantization, dim, oversampling, floor):
    """Qdrant's own scalar / binary quantization of the MaxSim fields: in the real engine, scores without
    re-scoring are the compressed ones (not the exact ones) and re-scoring restores exact scores for what it keeps;
    local mode ignores quantization (always exact)."""
    candidates, queries = unit(400, 8, dim), unit(8, 4, dim, seed=1)
    index = MetaEmbedIndex(dim=dim, num_vectors=8, dtype="float32")
    index.add(candidates)
    store = QdrantMetaEmbedIndex.from_index(index, engine(), "items", candidate_budgets=(8,), quantization=quantization)
    store.optimize()
    assert QdrantMetaEmbedIndex.open(store.client, "items").quantization == quantization
    exact = index.search(queries, budget=(4, 8), k=10)
    rescored = store.search(queries, budget=(4, 8), k=10, rescore=True, oversampling=oversampling)
    raw = store.search(queries, budget=(4, 8), k=10, rescore=False)
    recall = sum(len(set(a) & set(b)) for a, b in zip(rescored.ids, exact.ids)) / 80
    assert recall >= floor, recall
    exact_all = index.search(queries, budget=(4, 8), k=400)
    truth = [dict(zip(ids, scores)) for ids, scores in zip(exact_all.ids, exact_all.scores.tolist())]

    def error(found):  # the largest difference between a returned score and the exact score of that item
        return max(abs(s - truth[q][i]) for q in range(8) for i, s in zip(found.ids[q], found.scores[q].tolist()))

    rescored_error, raw_error = error(rescored), error(raw)
    assert rescored_error < 1e-4
    if engine.name == "edge":
        assert raw_error > 1e-3  # the engine really scored compressed vectors
    else:
        assert raw_error < 1e-4  # local mode does not quantize


def test_qdrants_multivector_cap_is_checked_with_a_clear_error(engine):
    with pytest.raises(ValueError, match=r"r_c=1025 at dimension 1024 is 1,049,600 floats .* 1,048,576"):
        QdrantMetaEmbedIndex.create(engine(), "big", dim=1024, candidate_budgets=(8, 1025))
    QdrantMetaEmbedIndex.create(engine(), "fits", dim=3584, candidate_budgets=(64,))  # the 7B shape fits


def test_bad_input_is_named(engine):
    client = engine()
    store = QdrantMetaEmbedIndex.create(client, "items", dim=8, candidate_budgets=(2, 4))
    with pytest.raises(ValueError, match="empty"):
        store.search(unit(1, 2, 8), k=1)
    with pytest.raises(ValueError, match="dimension 6"):
        store.add(unit(3, 4, 6), ids=[0, 1, 2])
    with pytest.raises(ValueError, match="2 vectors per item"):
        store.add(unit(3, 2, 8), ids=[0, 1, 2])
    with pytest.raises(ValueError, match="2 ids for 3 items"):
        store.add(unit(3, 4, 8), ids=[0, 1])
    with pytest.raises(ValueError, match="'a' appears more than once"):
        store.add(unit(3, 4, 8), ids=["a", "b", "a"])
    bad = unit(3, 4, 8)
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="item 1 .*non-finite"):
        store.add(bad, ids=[0, 1, 2])
    assert len(store) == 0  # nothing of a rejected batch was written

    store.add(unit(5, 4, 8), ids=list(range(5)))
    with pytest.raises(ValueError, match="r_c=3 is not stored .*\\(2, 4\\)"):
        store.search(unit(1, 2, 8), budget=(2, 3), k=1)
    with pytest.raises(ValueError, match="dimension 6"):
        store.search(unit(1, 2, 6), k=1)
    with pytest.raises(ValueError, match="k must be an integer in 1..5"):
        store.search(unit(1, 2, 8), k=6)
    with pytest.raises(ValueError, match="shortlist must be an integer of at least k=3"):
        store.search(unit(1, 2, 8), k=3, shortlist=2)
    with pytest.raises(ValueError, match="oversampling must be a number of at least 1"):
        store.search(unit(1, 2, 8), k=1, oversampling=0.5)
    with pytest.raises(ValueError, match="quantization must be None or one of"):
        QdrantMetaEmbedIndex.create(client, "other", dim=8, quantization="int4")
    with pytest.raises(ValueError, match="already exists"):
        QdrantMetaEmbedIndex.create(client, "items", dim=8)
    with pytest.raises(ValueError, match="does not exist"):
        QdrantMetaEmbedIndex.open(client, "missing")
    if isinstance(client, Edge):  # a shard made directly with the engine, without our metadata
        import qdrant_edge as qe

        qe.EdgeShard.create(
            str(client.folder / "other"),
            qe.EdgeConfig(vectors={"v": qe.EdgeVectorParams(size=8, distance=qe.Distance.Dot)}),
        ).close()
    else:
        client.create_collection("other", vectors_config={})
    with pytest.raises(ValueError, match="not written by QdrantMetaEmbedIndex"):
        QdrantMetaEmbedIndex.open(client, "other")


# ---------------------------------------------------------------------------------------------------- bulk ingest
def stored_vectors(store, item_id) -> dict:
    """{field: float64 array} of one stored point, read back from the engine itself."""
    pid = point_id(item_id)
    if isinstance(store.client, Edge):
        (record,) = store.client.shard(store.collection_name).retrieve([pid], False, True)
    else:
        (record,) = store.client.retrieve(store.collection_name, [pid], with_payload=False, with_vectors=True)
    return {name: np.asarray(vector, dtype=np.float64) for name, vector in record.vector.items()}


def embeddings_folder(path, candidates, ids, shard_rows=50, precision="float32"):
    save_embeddings(path, candidates, ids, role="candidate", model="test", precision=precision, shard_rows=shard_rows)
    return path


def test_streaming_ingest_equals_add(engine, tmp_path):
    candidates, ids = unit(130, 8, 16), [f"doc-{i}" for i in range(127)] + [7, 8, 9]  # str and int ids
    folder = embeddings_folder(tmp_path / "docs.emb", candidates, ids)  # 3 shards: 50, 50, 30
    added = QdrantMetaEmbedIndex.create(engine(), "added", dim=16, candidate_budgets=(4, 8))
    added.add(candidates, ids=ids)
    streamed = QdrantMetaEmbedIndex.create(engine(), "streamed", dim=16, candidate_budgets=(4, 8))
    assert streamed.add_from_embeddings(folder, batch_size=32) == {"added": 130, "skipped": 0}
    assert len(streamed) == len(added) == 130
    queries = unit(5, 4, 16, seed=1)
    for budget, shortlist in [((4, 8), None), ((2, 4), None), ((3, 1), None), ((4, 8), 20)]:
        expected = added.search(queries, budget=budget, k=6, shortlist=shortlist, exact=True)
        found = streamed.search(queries, budget=budget, k=6, shortlist=shortlist, exact=True)
        assert found.ids == expected.ids
        torch.testing.assert_close(found.scores, expected.scores, rtol=1e-5, atol=1e-5)
    assert stored_vectors(streamed, 7).keys() == stored_vectors(added, 7).keys()


@pytest.mark.parametrize("budgets", [(1, 4), (2, 3, 8)])
def test_a_point_stores_the_chosen_budgets_only(engine, tmp_path, budgets):
    """One field per budget above 1, holding that many of the item's first vectors; vector 0 as "coarse"; nothing
    of the vectors beyond the largest budget."""
    candidates = unit(20, 10, 16)
    candidates[:, 9] = float("nan")  # beyond every budget: never read, so not refused
    store = QdrantMetaEmbedIndex.create(engine(), "items", dim=16, candidate_budgets=budgets)
    store.add_from_embeddings(embeddings_folder(tmp_path / "docs.emb", candidates, list(range(20))))
    stored = stored_vectors(store, 3)
    assert sorted(stored) == sorted(["coarse", *(f"maxsim_{r}" for r in budgets if r > 1)])
    item = candidates[3].double().numpy()
    np.testing.assert_allclose(stored["coarse"], item[0], rtol=0, atol=1e-7)
    for r_c in budgets:
        if r_c > 1:
            np.testing.assert_allclose(stored[f"maxsim_{r_c}"], item[:r_c], rtol=0, atol=1e-7)
    floats = sum(v.size for v in stored.values())
    assert floats == (1 + sum(r for r in budgets if r > 1)) * 16


def test_float16_storage_keeps_scores_within_its_rounding(engine, tmp_path):
    """Qdrant's float16 storage (the embedded engine; local mode ignores it): stored values are the float16
    roundings, and each score is within r_q * 2^-10 of float32 MaxSim (unit vectors: each of the r_q maxima moves
    by at most |q| |c - fp16(c)| <= 2^-11, and the engine may round the query too)."""
    candidates, queries = unit(200, 8, 32), unit(6, 4, 32, seed=1)
    folder = embeddings_folder(tmp_path / "docs.emb", candidates, list(range(200)), precision="float16")
    store = QdrantMetaEmbedIndex.create(engine(), "items", dim=32, candidate_budgets=(8,), datatype="float16")
    store.add_from_embeddings(folder)
    store.optimize()
    reopened = QdrantMetaEmbedIndex.open(store.client, "items")
    assert reopened.datatype == "float16" and "float16" in repr(reopened)
    # The folder holds float16 already: the stored values are exactly its values, whatever the engine stores.
    half = candidates.half().double()
    np.testing.assert_allclose(stored_vectors(store, 5)["maxsim_8"], half[5].numpy(), rtol=0, atol=0)
    # A float32 item: the engine stores its float16 rounding; local mode stores float32.
    store.add(unit(1, 8, 32, seed=9), ids=["f32"])
    item = unit(1, 8, 32, seed=9)[0]
    kept = item.half() if engine.name == "edge" else item
    np.testing.assert_allclose(stored_vectors(store, "f32")["maxsim_8"], kept.double().numpy(), rtol=0, atol=0)
    exact = maxsim(queries, torch.cat([candidates, item[None]]), budget=(4, 8))
    found = store.search(queries, budget=(4, 8), k=10)
    positions = torch.tensor([[200 if i == "f32" else i for i in row] for row in found.ids])
    hits = exact.gather(1, positions)
    bound = 4 * 2**-10
    assert (found.scores - hits).abs().max() <= bound
    kth = exact.topk(10, dim=1).values[:, -1:]
    assert (hits >= kth - 2 * bound).all()  # the top-10 but for near ties


def test_skip_existing_resumes_an_interrupted_ingest(engine, tmp_path):
    candidates, ids = unit(120, 4, 8), list(range(120))
    folder = embeddings_folder(tmp_path / "docs.emb", candidates, ids)
    store = QdrantMetaEmbedIndex.create(engine(), "items", dim=8, candidate_budgets=(4,))
    store.add(candidates[:70], ids=ids[:70])  # the first shard and part of the second, as an interruption leaves
    assert store.add_from_embeddings(folder, batch_size=16, skip_existing=True) == {"added": 50, "skipped": 70}
    assert store.add_from_embeddings(folder, batch_size=16) == {"added": 120, "skipped": 0}  # idempotent
    full = QdrantMetaEmbedIndex.create(engine(), "full", dim=8, candidate_budgets=(4,))
    full.add(candidates, ids=ids)
    queries = unit(3, 2, 8, seed=4)
    assert len(store) == 120
    assert store.search(queries, k=10).ids == full.search(queries, k=10).ids


def test_a_bad_shard_is_refused_with_its_name(engine, tmp_path):
    candidates, ids = unit(120, 4, 8), [f"doc-{i}" for i in range(120)]
    store = QdrantMetaEmbedIndex.create(engine(), "items", dim=8, candidate_budgets=(2, 4), datatype="float16")
    # Refused before anything is written: the folder's role, dimension or number of vectors.
    queries = tmp_path / "queries.emb"
    save_embeddings(queries, candidates, ids, role="query", model="test")
    with pytest.raises(ValueError, match="queries.emb: holds query embeddings, expected candidate"):
        store.add_from_embeddings(queries)
    with pytest.raises(ValueError, match="dimension 6, but collection 'items' holds dimension 8"):
        store.add_from_embeddings(embeddings_folder(tmp_path / "d6.emb", unit(10, 4, 6), list(range(10))))
    with pytest.raises(ValueError, match="3 vectors per item, but collection 'items' stores .* up to r_c=4"):
        store.add_from_embeddings(embeddings_folder(tmp_path / "r3.emb", unit(10, 3, 8), list(range(10))))
    with pytest.raises(ValueError, match="not a MetaEmbed embeddings folder"):
        store.add_from_embeddings(tmp_path)
    assert len(store) == 0

    # A bad item in the second shard: named with its shard; the first shard is in, and a fixed re-run completes.
    bad = candidates.clone()
    bad[73, 1, 2] = float("nan")
    folder = embeddings_folder(tmp_path / "docs.emb", bad, ids)
    with pytest.raises(ValueError, match=r"chunk-000001\.safetensors: item 'doc-73' \(position 23\) has non-finite"):
        store.add_from_embeddings(folder)
    assert len(store) == 50
    bad[73, 3, 0] = float("nan")  # beyond budget 2 but within 4: still refused
    bad[73, :2] = candidates[73, :2]
    with pytest.raises(ValueError, match="doc-73.*non-finite.*the 50 items before it are in"):
        store.add_from_embeddings(embeddings_folder(tmp_path / "docs.emb", bad, ids))
    big = candidates.clone()
    big[101, 0, 0] = 7e4  # beyond float16: this collection stores float16
    with pytest.raises(ValueError, match=r"chunk-000002\.safetensors: item 'doc-101' .*magnitude 70000.*float16"):
        store.add_from_embeddings(embeddings_folder(tmp_path / "docs.emb", big, ids))
    repeated = ids[:99] + ["doc-3"] + ids[100:]
    with pytest.raises(ValueError, match=r"chunk-000001\.safetensors: id 'doc-3' appears more than once"):
        store.add_from_embeddings(embeddings_folder(tmp_path / "docs.emb", candidates, repeated))
    folder = embeddings_folder(tmp_path / "docs.emb", candidates, ids)
    (folder / "chunk-000002.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"cannot read shard chunk-000002\.safetensors"):
        store.add_from_embeddings(folder)
    assert store.add_from_embeddings(embeddings_folder(tmp_path / "docs.emb", candidates, ids))["added"] == 120
    assert len(store) == 120
    with pytest.raises(ValueError, match="datatype must be one of"):
        QdrantMetaEmbedIndex.create(store.client, "other", dim=8, datatype="uint8")


def test_the_qdrant_ingest_command(engine, tmp_path, capsys):
    from metaembed.cli import main

    candidates, ids = unit(90, 8, 16), [f"doc-{i}" for i in range(90)]
    folder = str(embeddings_folder(tmp_path / "docs.emb", candidates, ids, precision="bfloat16"))
    where = ["--edge", str(tmp_path / "edge")] if engine.name == "edge" else ["--local", str(tmp_path / "local")]
    assert main(["qdrant-ingest", folder, "pages", *where, "--budgets", "4", "1", "--quiet"]) == 0
    assert main(["qdrant-ingest", folder, "pages", *where, "--skip-existing"]) == 0  # a re-run: nothing to send
    assert "wrote 0 items, 90 already stored into QdrantMetaEmbedIndex('pages'" in capsys.readouterr().err
    assert main(["qdrant-ingest", folder, "pages", *where, "--budgets", "8", "--quiet"]) == 2
    assert "collection 'pages' exists with budgets (1, 4), not (8,)" in capsys.readouterr().err
    assert main(["qdrant-ingest", str(tmp_path / "missing"), "other", *where]) == 2
    assert "missing: not a MetaEmbed embeddings folder" in capsys.readouterr().err

    client = Edge(tmp_path / "edge") if engine.name == "edge" else QdrantClient(path=str(tmp_path / "local"))
    store = QdrantMetaEmbedIndex.open(client, "pages")
    assert (store.candidate_budgets, store.datatype, len(store)) == ((1, 4), "float16", 90)  # a bf16 folder
    found = store.search(candidates[[5, 17], :2], budget=(2, 4), k=1)
    assert found.ids == [["doc-5"], ["doc-17"]]
    client.close()
