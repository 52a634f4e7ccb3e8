"""MetaEmbedIndex: exact search at every budget, incremental adds, files validated on load, bad input named."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from metaembed.retrieval.index import IndexFileError, MetaEmbedIndex
from modeling_metaembed.scoring_metaembed import maxsim

BUDGETS = [(1, 1), (2, 4), (4, 8), (8, 16)]


def unit(*shape, seed=0):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def reference_top_k(queries, candidates, budget, k):
    scores = maxsim(queries, candidates, budget=budget)
    return scores.topk(k, dim=1)


def assert_same_top_k(positions, reference_scores, k):
    """`positions` [Q, k] rank like the top-k of `reference_scores` [Q, N] but for near ties: the search computes
    its scores in another float32 order (tiles, query batches, bmm), which may swap items whose scores are a few
    ulps apart, so each rank's reference score must match the reference top-k's within float32 rounding."""
    torch.testing.assert_close(
        reference_scores.gather(1, positions), reference_scores.topk(k, dim=1).values, rtol=0, atol=1e-5
    )
    assert all(len(set(row)) == k for row in positions.tolist())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("max_work_bytes", [40_000, 1 << 28])  # a few candidates per tile, or one tile
def test_search_returns_the_exact_top_k_at_every_budget(dtype, max_work_bytes):
    candidates, queries = unit(50, 16, 32), unit(7, 8, 32, seed=1)
    index = MetaEmbedIndex(dim=32, num_vectors=16, dtype=dtype)
    index.add(candidates)
    stored = candidates.to(index.dtype).float()  # the reference scores what the index stores, with float32 queries
    for budget in BUDGETS:
        result = index.search(queries, budget=budget, k=5, query_batch_size=3, max_work_bytes=max_work_bytes)
        reference = maxsim(queries, stored, budget=budget)
        torch.testing.assert_close(result.scores, reference.topk(5, dim=1).values, rtol=1e-5, atol=1e-5)
        assert_same_top_k(result.positions, reference, 5)  # bf16 at (1, 1): query 5's ranks 4 and 5 are 9.4e-7 apart
        assert result.ids == result.positions.tolist()


def test_queries_are_not_rounded_to_the_storage_dtype():
    """A bf16 index scores float32 queries as given: its top-k is the float32-query reference's, and differs from
    what queries rounded to bf16 would give (so the test can tell the two apart)."""
    candidates, queries = unit(2000, 8, 64, seed=7), unit(40, 4, 64, seed=8)
    index = MetaEmbedIndex(dim=64, num_vectors=8, dtype="bfloat16")
    index.add(candidates)
    stored = candidates.bfloat16().float()
    found = index.search(queries, budget=(4, 8), k=10)
    reference = maxsim(queries, stored, budget=(4, 8))  # query 14's ranks 9 and 10 are 1 ulp (1.2e-7) apart
    exact = reference.topk(10, dim=1)
    rounded = reference_top_k(queries.bfloat16().float(), stored, (4, 8), 10)
    assert_same_top_k(found.positions, reference, 10)
    torch.testing.assert_close(found.scores, exact.values, rtol=0, atol=1e-5)
    assert (reference.gather(1, rounded.indices) - exact.values).abs().max() > 1e-4  # measured 1.3e-3
    two_stage = index.search_two_stage(queries, budget=(4, 8), k=10, shortlist=2000)
    assert_same_top_k(two_stage.positions, reference, 10)


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


@pytest.mark.parametrize("mmap", [False, True])
def test_tier_norms_follow_adds_round_trip_and_are_checked(tmp_path, mmap):
    """The largest stored vector norm of each tier (what certifies the AMX kernel's two-part scan) follows every add
    and round-trips; an index saved without it (by an earlier version) gets it computed when read into memory, and
    none (three-part scans) when mapped; a file whose norms are negative or not finite is refused."""
    embeddings = unit(30, 4, 16) * torch.linspace(0.5, 3.0, 30).view(30, 1, 1)
    index = MetaEmbedIndex(16, 4)
    index.add(embeddings[:10])
    index.add(embeddings[10:])
    expected = embeddings.bfloat16().float().norm(dim=-1).amax(dim=0)
    torch.testing.assert_close(index._tail.max_norms, expected)
    norms = index._tail.max_norms.clone()
    folder = tmp_path / "index"
    index.save(folder)
    (segment,) = MetaEmbedIndex.load(folder, mmap=mmap)._saved  # one saved segment, its norms
    assert torch.equal(segment.max_norms, norms)

    def rewrite(max_norms):
        path = folder / "segment-000001" / "vectors.safetensors"
        tensors = load_file(path)
        tensors.pop("max_norms", None)
        if max_norms is not None:
            tensors["max_norms"] = max_norms
        save_file(tensors, str(path), metadata={"format": "metaembed-index/1"})
        manifest = json.loads((folder / "index.json").read_text())
        manifest["segments"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (folder / "index.json").write_text(json.dumps(manifest))

    rewrite(None)
    earlier = MetaEmbedIndex.load(folder, mmap=mmap)
    if mmap:
        assert earlier._saved[0].max_norms is None
    else:  # computed over all 30 items at once, the index's over its two adds: equal up to float32 rounding
        torch.testing.assert_close(earlier._saved[0].max_norms, norms, rtol=0, atol=1e-6)
    queries = unit(3, 4, 16, seed=1)
    assert earlier.search(queries, k=5).ids == index.search(queries, k=5).ids
    for bad in (torch.full((4,), -1.0), torch.tensor([1.0, float("nan"), 1.0, 1.0])):
        rewrite(bad)
        with pytest.raises(IndexFileError, match="max_norms"):
            MetaEmbedIndex.load(folder, mmap=mmap)


def test_saving_again_replaces_the_index_and_a_failed_save_keeps_the_old_one(tmp_path, monkeypatch):
    folder = tmp_path / "index"
    index = MetaEmbedIndex(8, 2, dtype="float32")
    index.add(unit(5, 2, 8))
    index.save(folder)
    index.add(unit(3, 2, 8, seed=1))
    index.save(folder)
    assert len(MetaEmbedIndex.load(folder)) == 8

    import metaembed.retrieval.segment as module

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
    tensor_file, manifest_file = folder / "segment-000001" / "vectors.safetensors", folder / "index.json"
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
    for key, value, message in [
        ("count", 11, "the segments hold 10 items, count says 11"),
        ("segments", [{**manifest["segments"][0], "count": 11}], "count says 10"),
        ("segments", [{**manifest["segments"][0], "name": "../elsewhere"}], "segment-NNNNNN"),
        ("dim", 4, r"manifest says .*\[2, 10, 4\]"),
        ("dtype", "int4", "dtype"),
        ("format", "other/1", "format"),
    ]:
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
        MetaEmbedIndex(16, 4, dtype="int4")


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


@pytest.mark.parametrize("dtype, vector_bytes", [("int8", 32 + 4), ("binary", 4 + 8)])
def test_compressed_index_re_scores_a_shortlist_exactly_at_every_budget(dtype, vector_bytes):
    candidates, queries = unit(300, 8, 32), unit(6, 4, 32, seed=1)
    index = MetaEmbedIndex(dim=32, num_vectors=8, dtype=dtype, full_dtype="float32")
    index.add(candidates[:100])
    index.add(candidates[100:])  # incremental adds quantize each batch
    assert index.bytes_per_item(4) == 4 * vector_bytes and index.nbytes == 300 * 8 * vector_bytes
    for budget in BUDGETS[:3]:
        exact = reference_top_k(queries, candidates, budget, 5)
        # A shortlist of every item: the exact top-k, scored exactly.
        whole = index.search(queries, budget=budget, k=5, shortlist=300, max_work_bytes=40_000)
        assert torch.equal(whole.positions, exact.indices)
        torch.testing.assert_close(whole.scores, exact.values, rtol=0, atol=1e-5)
        # A short one: exact scores of what the compressed scan kept, most of the exact top-k.
        short = index.search(queries, budget=budget, k=5, shortlist=30)
        expected_scores = maxsim(queries, candidates, budget=budget).gather(1, short.positions)
        torch.testing.assert_close(short.scores, expected_scores, rtol=0, atol=1e-5)
        recall = sum(len(set(a) & set(b)) for a, b in zip(short.ids, exact.indices.tolist())) / exact.indices.numel()
        assert recall >= (0.9 if dtype == "int8" else 0.5), (budget, recall)  # a random shortlist: 0.1
    staged = index.search_two_stage(queries, budget=(4, 8), k=5, shortlist=300)
    assert torch.equal(staged.positions, reference_top_k(queries, candidates, (4, 8), 5).indices)


def test_binary_signs_are_taken_around_the_center_of_the_items():
    """Embeddings sharing a strong common direction per tier (as trained ones do) keep their ranking under binary
    codes only when the signs are taken around each tier's center, with the component along it kept exactly."""
    common = unit(8, 64, seed=5) * 4  # another strong direction per tier
    candidates = torch.nn.functional.normalize(unit(300, 8, 64) + common, dim=-1)
    queries = torch.nn.functional.normalize(unit(6, 4, 64, seed=1) + common[:4], dim=-1)
    index = MetaEmbedIndex(dim=64, num_vectors=8, dtype="binary", full_dtype="float32")
    index.add(candidates)
    exact = reference_top_k(queries, candidates, (4, 8), 10).indices.tolist()
    found = index.search(queries, budget=(4, 8), k=10, shortlist=40).positions.tolist()
    torch.testing.assert_close(index._tail.centers, candidates.mean(dim=0))  # fitted at the first search
    recall = sum(len(set(a) & set(b)) for a, b in zip(found, exact)) / 60
    assert recall >= 0.6, recall  # measured 0.82; raw signs (no centers) 0.33; a random shortlist of 40: 0.13


def test_int8_scan_is_close_and_binary_keeps_signs():
    from metaembed.retrieval.index import quantize

    x = unit(50, 3, 64)
    codes, scales, _ = quantize(x, "int8")
    assert codes.dtype == torch.int8 and scales.shape == (50, 3)
    assert (codes.float() * scales.unsqueeze(-1) - x).abs().max() <= scales.max() / 2 + 1e-7
    bits, mean_abs, offsets = quantize(x, "binary")  # no center: plain signs, offset = -s <sign, 0> = 0
    assert bits.shape == (50, 3, 8) and bits.dtype == torch.uint8
    unpacked = (bits.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # bit b of byte i is dim 8i + b
    assert torch.equal(unpacked.reshape(50, 3, 64).bool(), x > 0)
    torch.testing.assert_close(mean_abs, x.abs().mean(-1))
    assert torch.equal(offsets, torch.zeros(50, 3))
    center = unit(64, seed=3)  # around a center, the component along it reads back exactly
    bits, scales, offsets = quantize(x, "binary", center=center)
    signs = ((bits.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(50, 3, 64).float() * 2 - 1
    back = center + offsets.unsqueeze(-1) * center + scales.unsqueeze(-1) * signs
    torch.testing.assert_close(back @ center, x @ center, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["int8", "binary"])
def test_compressed_index_files_round_trip_and_are_checked(tmp_path, dtype):
    index = MetaEmbedIndex(16, 4, dtype=dtype)
    index.add(unit(40, 4, 16), ids=[f"p{i}" for i in range(40)])
    index.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        ".metaembed-index.lock",
        "index.json",
        "segment-000001",
    ]
    assert sorted(p.name for p in (tmp_path / "index" / "segment-000001").iterdir()) == [
        "full.safetensors",
        "ids.jsonl",
        "vectors.safetensors",
    ]
    queries = unit(3, 2, 16, seed=1)
    for mmap in (False, True):
        loaded = MetaEmbedIndex.load(tmp_path / "index", mmap=mmap)
        assert (loaded.dtype_name, loaded.full_dtype_name, len(loaded)) == (dtype, "bfloat16", 40)
        assert torch.equal(loaded.codes, index.codes) and torch.equal(loaded.scales, index.scales)
        assert torch.equal(loaded.vectors, index.vectors)
        a, b = index.search(queries, (2, 4), k=5, shortlist=10), loaded.search(queries, (2, 4), k=5, shortlist=10)
        assert a.ids == b.ids and torch.equal(a.scores, b.scores)
    full = tmp_path / "index" / "segment-000001" / "full.safetensors"
    original = full.read_bytes()
    full.write_bytes(original[:-4] + bytes(4))
    with pytest.raises(IndexFileError, match="full.safetensors does not match the checksum"):
        MetaEmbedIndex.load(tmp_path / "index")
    full.unlink()
    with pytest.raises(IndexFileError, match="full.safetensors is missing"):
        MetaEmbedIndex.load(tmp_path / "index")


def test_compressed_index_arguments_are_checked():
    with pytest.raises(ValueError, match="multiple of 8, got 12"):
        MetaEmbedIndex(12, 2, dtype="binary")
    with pytest.raises(ValueError, match="full_dtype|dtype must be one of"):
        MetaEmbedIndex(16, 2, dtype="int8", full_dtype="int8")
    index = MetaEmbedIndex(16, 2, dtype="int8")
    index.add(unit(10, 2, 16))
    with pytest.raises(ValueError, match="shortlist must be an integer of at least k=5"):
        index.search(unit(1, 2, 16), k=5, shortlist=3)
    exact = MetaEmbedIndex(16, 2)
    exact.add(unit(10, 2, 16))
    with pytest.raises(ValueError, match="shortlist applies to int8 / binary"):
        exact.search(unit(1, 2, 16), k=5, shortlist=8)
    with pytest.raises(ValueError, match="max_work_bytes=1,000 is too small"):
        exact.search(unit(1, 2, 16), k=5, max_work_bytes=1000)
