"""MetaEmbedIndex: exact search at every budget, incremental adds, files validated on load, bad input named."""

import json

import pytest
import torch

from metaembed.index import IndexFileError, MetaEmbedIndex
from modeling_metaembed.scoring_metaembed import maxsim

BUDGETS = [(1, 1), (2, 4), (4, 8), (8, 16)]


def unit(*shape, seed=0):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def reference_top_k(queries, candidates, budget, k):
    scores = maxsim(queries, candidates, budget=budget)
    return scores.topk(k, dim=1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("max_block_bytes", [4 * 8 * 3 * 2 * 6, 1 << 28])  # a few candidates per block, or one block
def test_search_returns_the_exact_top_k_at_every_budget(dtype, max_block_bytes):
    candidates, queries = unit(50, 16, 32), unit(7, 8, 32, seed=1)
    index = MetaEmbedIndex(dim=32, num_vectors=16, dtype=dtype)
    index.add(candidates)
    stored = candidates.to(index.dtype)  # the reference scores what the index stores
    for budget in BUDGETS:
        result = index.search(queries, budget=budget, k=5, query_batch_size=3, max_block_bytes=max_block_bytes)
        expected = reference_top_k(queries.to(index.dtype), stored, budget, 5)
        torch.testing.assert_close(result.scores, expected.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(result.positions, expected.indices)
        assert result.ids == expected.indices.tolist()


def test_budget_reads_only_the_first_r_c_vectors():
    candidates = unit(20, 8, 16)
    index = MetaEmbedIndex(dim=16, num_vectors=8, dtype="float32")
    index.add(candidates)
    changed = candidates.clone()
    changed[:, 4:] = unit(20, 4, 16, seed=5)  # vectors beyond r_c = 4 must not matter at (2, 4)
    other = MetaEmbedIndex(dim=16, num_vectors=8, dtype="float32")
    other.add(changed)
    queries = unit(3, 4, 16, seed=2)
    a, b = index.search(queries, budget=(2, 4), k=20), other.search(queries, budget=(2, 4), k=20)
    assert torch.equal(a.scores, b.scores)
    full_a, full_b = index.search(queries, budget=(2, 8), k=20), other.search(queries, budget=(2, 8), k=20)
    assert not torch.equal(full_a.scores, full_b.scores)
    assert index.vectors[3].is_contiguous()  # each vector tier is one contiguous [N, D] matrix


def test_incremental_adds_with_chosen_ids_equal_one_add():
    candidates = unit(30, 6, 16)
    ids = [f"doc-{i}" for i in range(30)]
    whole = MetaEmbedIndex(16, 4, dtype="float32")
    whole.add(candidates, ids=ids)
    pieces = MetaEmbedIndex(16, 4, dtype="float32")
    for start in range(0, 30, 7):
        pieces.add(candidates[start : start + 7], ids=ids[start : start + 7])
    assert len(pieces) == 30 and pieces.ids == ids
    queries = unit(4, 2, 16, seed=3)
    a, b = whole.search(queries, budget=(2, 4), k=6), pieces.search(queries, budget=(2, 4), k=6)
    assert torch.equal(a.scores, b.scores) and a.ids == b.ids
    assert all(isinstance(i, str) and i.startswith("doc-") for row in a.ids for i in row)


@pytest.mark.parametrize("mmap", [False, True])
def test_save_and_load_round_trip(tmp_path, mmap):
    index = MetaEmbedIndex(16, 8)
    index.add(unit(40, 8, 16), ids=list(range(100, 140)))
    index.save(tmp_path / "index")
    loaded = MetaEmbedIndex.load(tmp_path / "index", mmap=mmap)
    assert (loaded.dim, loaded.num_vectors, loaded.dtype, len(loaded)) == (16, 8, torch.bfloat16, 40)
    assert loaded.ids == list(range(100, 140))
    assert torch.equal(loaded.vectors, index.vectors)
    queries = unit(3, 4, 16, seed=1)
    a, b = index.search(queries, budget=(4, 8), k=7), loaded.search(queries, budget=(4, 8), k=7)
    assert torch.equal(a.scores, b.scores) and a.ids == b.ids
    loaded.add(unit(2, 8, 16, seed=9), ids=[1, 2])  # a mapped index is copied into memory on the first add
    assert len(loaded) == 42 and loaded.search(queries, k=1).ids[0][0] in loaded.ids


def test_saving_again_replaces_the_index_and_a_failed_save_keeps_the_old_one(tmp_path, monkeypatch):
    folder = tmp_path / "index"
    index = MetaEmbedIndex(8, 2, dtype="float32")
    index.add(unit(5, 2, 8))
    index.save(folder)
    index.add(unit(3, 2, 8, seed=1))
    index.save(folder)
    assert len(MetaEmbedIndex.load(folder)) == 8

    import metaembed.index as module

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    index.add(unit(1, 2, 8, seed=2))
    monkeypatch.setattr(module, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        index.save(folder)
    assert len(MetaEmbedIndex.load(folder)) == 8  # the previous complete index is still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no staging folder left behind


def test_tampered_truncated_or_inconsistent_files_are_refused(tmp_path):
    folder = tmp_path / "index"
    index = MetaEmbedIndex(8, 2)
    index.add(unit(10, 2, 8))
    index.save(folder)
    tensor_file, manifest_file = folder / "vectors.safetensors", folder / "index.json"
    original = tensor_file.read_bytes()

    tampered = bytearray(original)
    tampered[-3] ^= 0xFF
    tensor_file.write_bytes(bytes(tampered))
    with pytest.raises(IndexFileError, match="checksum"):
        MetaEmbedIndex.load(folder)

    tensor_file.write_bytes(original[:-10])
    with pytest.raises(IndexFileError, match="checksum"):
        MetaEmbedIndex.load(folder)
    with pytest.raises(IndexFileError, match="truncated"):
        MetaEmbedIndex.load(folder, verify_checksum=False)
    tensor_file.write_bytes(original[:5])
    with pytest.raises(IndexFileError, match="truncated"):
        MetaEmbedIndex.load(folder, verify_checksum=False)
    tensor_file.write_bytes(original)

    manifest = json.loads(manifest_file.read_text())
    for key, value, message in [("count", 11, "ids must be a list of 11"), ("dim", 4, r"manifest says .*\[2, 10, 4\]"),
                                ("dtype", "int8", "dtype"), ("format", "other/1", "format")]:  # fmt: skip
        manifest_file.write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(IndexFileError, match=message):
            MetaEmbedIndex.load(folder)
    manifest_file.write_text("{not json")
    with pytest.raises(IndexFileError, match="not valid JSON"):
        MetaEmbedIndex.load(folder)
    manifest_file.unlink()
    with pytest.raises(IndexFileError, match="missing"):
        MetaEmbedIndex.load(folder)


def test_bad_input_is_named_and_leaves_the_index_unchanged():
    index = MetaEmbedIndex(16, 4)
    with pytest.raises(ValueError, match="empty"):
        index.search(unit(1, 2, 16))
    index.add(unit(5, 4, 16), ids=["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="dimension 8 but this index holds dimension 16"):
        index.search(unit(1, 2, 8))
    with pytest.raises(ValueError, match="r_c=8 is outside 1..4"):
        index.search(unit(1, 2, 16), budget=(1, 8))
    with pytest.raises(ValueError, match="r_q=3 is outside 1..2"):
        index.search(unit(1, 2, 16), budget=(3, 4))
    with pytest.raises(ValueError, match=r"k must be an integer in 1..5"):
        index.search(unit(1, 2, 16), k=6)
    with pytest.raises(ValueError, match=r"id 'c' \(position 1\) is already in the index"):
        index.add(unit(2, 4, 16), ids=["x", "c"])
    with pytest.raises(ValueError, match="2 ids for 3 items"):
        index.add(unit(3, 4, 16), ids=["x", "y"])
    with pytest.raises(ValueError, match="3 vectors per item but this index keeps 4"):
        index.add(unit(2, 3, 16))
    with pytest.raises(ValueError, match="dimension 8"):
        index.add(unit(2, 4, 8))
    broken = unit(3, 4, 16)
    broken[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="item 2 of this batch has non-finite"):
        index.add(broken, ids=["x", "y", "z"])
    assert len(index) == 5 and index.ids == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match="dtype"):
        MetaEmbedIndex(16, 4, dtype="int8")


def test_add_items_encodes_candidates_through_the_model(tiny_model):
    model = tiny_model("qwen3")
    texts = ["a red apple", "a blue car", "a green tree", "a yellow sun"]
    index = MetaEmbedIndex(model.config.output_dim, model.config.num_candidate_vectors, dtype="float32")
    index.add_items(model, texts, ids=texts, show_progress_bar=False)
    direct = model.encode_candidates(texts)
    assert torch.allclose(index.vectors.transpose(0, 1), direct, atol=1e-6)
    queries = model.encode_queries(texts)
    result = index.search(queries, budget=(2, 4), k=4)
    expected = reference_top_k(queries, direct, (2, 4), 4)
    assert [[texts[i] for i in row] for row in expected.indices.tolist()] == result.ids


def test_two_stage_search_re_ranks_the_coarse_shortlist_exactly():
    candidates, queries = unit(60, 8, 16), unit(5, 4, 16, seed=1)
    index = MetaEmbedIndex(16, 8, dtype="float32")
    index.add(candidates)
    # A shortlist of every item is exhaustive search.
    full, exact = index.search_two_stage(queries, budget=(4, 8), k=5, shortlist=60), index.search(queries, (4, 8), k=5)
    torch.testing.assert_close(full.scores, exact.scores, rtol=1e-5, atol=1e-5)
    assert full.ids == exact.ids
    # A short shortlist: the results are the (1,1) shortlist re-ranked by the budget's MaxSim.
    coarse = index.search(queries, budget=(1, 1), k=10)
    result = index.search_two_stage(queries, budget=(4, 8), k=3, shortlist=10)
    for row in range(5):
        shortlist = coarse.positions[row]
        fine = maxsim(queries[row : row + 1], candidates[shortlist], budget=(4, 8))[0]
        assert result.positions[row].tolist() == shortlist[fine.topk(3).indices].tolist()
    with pytest.raises(ValueError, match="larger than the shortlist"):
        index.search_two_stage(queries, budget=(4, 8), k=20, shortlist=10)
    with pytest.raises(ValueError, match=r"k must be an integer in 1..60"):
        index.search_two_stage(queries, budget=(4, 8), k=70, shortlist=100)
    with pytest.raises(ValueError, match="queries must be a floating-point tensor"):
        index.search_two_stage([[0.0] * 16], budget=(1, 1), k=1)
