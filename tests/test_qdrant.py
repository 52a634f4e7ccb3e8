"""QdrantMetaEmbedIndex in Qdrant's embedded local mode: the same results as MetaEmbedIndex, persistence, bad input."""

import pytest
import torch

pytest.importorskip("qdrant_client")  # a declared test dependency: this only guards odd environments
from qdrant_client import QdrantClient

from metaembed.index import MetaEmbedIndex
from metaembed.qdrant import QdrantMetaEmbedIndex, point_id


def unit(*shape, seed=0):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture
def pair():
    """The same 120 items in a float32 MetaEmbedIndex and in a Qdrant collection with candidate budgets 4 and 8."""
    index = MetaEmbedIndex(dim=16, num_vectors=8, dtype="float32")
    index.add(unit(120, 8, 16), ids=[f"doc-{i}" for i in range(120)])
    store = QdrantMetaEmbedIndex.from_index(index, QdrantClient(":memory:"), "items", candidate_budgets=(4, 8))
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


def test_model_embeddings_give_the_same_results(tiny_model):
    model = tiny_model("qwen2_5_vl")
    texts = [f"item number {i} about topic {i % 5}" for i in range(24)]
    candidates = model.encode(texts, role="candidate", show_progress_bar=False)
    queries = model.encode(["topic 1", "item number 7"], role="query", show_progress_bar=False)
    r_c = candidates.shape[1]
    index = MetaEmbedIndex(dim=candidates.shape[-1], num_vectors=r_c, dtype="float32")
    index.add(candidates, ids=texts)
    store = QdrantMetaEmbedIndex.create(QdrantClient(":memory:"), "texts", candidates.shape[-1], (r_c,))
    store.add(candidates, ids=texts)
    for budget in [(1, 1), (queries.shape[1], r_c)]:
        expected, found = index.search(queries, budget=budget, k=5), store.search(queries, budget=budget, k=5)
        assert found.ids == expected.ids
        torch.testing.assert_close(found.scores, expected.scores, rtol=1e-5, atol=1e-5)


def test_a_collection_on_disk_reopens_with_the_same_results(tmp_path):
    candidates, queries = unit(40, 4, 8), unit(3, 2, 8, seed=3)
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    store = QdrantMetaEmbedIndex.create(client, "items", dim=8, candidate_budgets=(2, 4))
    store.add(candidates, ids=list(range(40)))
    before = store.search(queries, budget=(2, 4), k=5)
    client.close()

    client = QdrantClient(path=str(tmp_path / "qdrant"))
    reopened = QdrantMetaEmbedIndex.open(client, "items")
    assert (reopened.dim, reopened.candidate_budgets, len(reopened)) == (8, (2, 4), 40)
    after = reopened.search(queries, budget=(2, 4), k=5)
    assert after.ids == before.ids and all(isinstance(i, int) for i in after.ids[0])
    client.close()


def test_re_adding_an_item_replaces_it():
    store = QdrantMetaEmbedIndex.create(QdrantClient(":memory:"), "items", dim=8, candidate_budgets=(4,))
    candidates = unit(10, 4, 8)
    store.add(candidates, ids=list(range(10)))
    store.add(candidates[:3].flip(0), ids=[0, 1, 2])  # an interrupted upload re-run, with new vectors for 0..2
    assert len(store) == 10
    top = store.search(candidates[0], budget=(4, 4), k=1)  # item 2 now holds item 0's old vectors
    assert top.ids == [[2]]
    assert point_id(1) != point_id("1")


def test_bad_input_is_named():
    client = QdrantClient(":memory:")
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
    with pytest.raises(ValueError, match="already exists"):
        QdrantMetaEmbedIndex.create(client, "items", dim=8)
    with pytest.raises(ValueError, match="does not exist"):
        QdrantMetaEmbedIndex.open(client, "missing")
    client.create_collection("other", vectors_config={})
    with pytest.raises(ValueError, match="not written by QdrantMetaEmbedIndex"):
        QdrantMetaEmbedIndex.open(client, "other")
