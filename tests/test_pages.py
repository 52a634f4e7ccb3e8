"""The pages task (metaembed.quickstart.pages), the memoized frozen tower and the closed-form projector start."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from metaembed.quickstart import QuickstartSettings, build_model, load_data
from metaembed.quickstart.frozen_features import MemoizedTower, memoized_tower, ridge_map, set_mlp_to_linear_map
from metaembed.quickstart.pages import (
    QUERY_KINDS,
    PageLayout,
    evaluation_set,
    layout_pages,
    picture_png,
    render_alone,
    render_page,
    training_records,
)
from metaembed.quickstart.twemoji import split_pairs, twemoji_pairs


@pytest.fixture(scope="module")
def split():
    return split_pairs(twemoji_pairs())


def test_each_round_holds_every_emoji_at_most_once_and_depends_only_on_the_seed(split):
    train, _ = split
    layout = PageLayout()
    pages = layout_pages(train, layout, rounds=3, seed=7)
    per_round = len(train) // 4
    assert len(pages) == 3 * per_round and all(len(page) == 4 for page in pages)
    for r in range(3):
        ids = [p["id"] for page in pages[r * per_round : (r + 1) * per_round] for p in page]
        assert len(ids) == len(set(ids))
    assert layout_pages(train, layout, 3, seed=7) == pages
    assert layout_pages(train, layout, 3, seed=8) != pages


def test_a_page_is_its_emoji_on_the_grid(split):
    train, _ = split
    layout = PageLayout(page_size=192, grid=2, margin=6)
    items = [p["image"] for p in train[:4]]
    page = render_page(items, layout)
    assert page.size == (192, 192) and page.mode == "RGB"
    assert page.getpixel((1, 1)) == (255, 255, 255)  # the margin is background
    shuffled = render_page(items[::-1], layout)
    assert list(page.getdata()) != list(shuffled.getdata())
    with pytest.raises(ValueError, match="holds 4 emoji, got 3"):
        render_page(items[:3], layout)
    # An item alone in its cell (the probe's per-item encoding): that cell as on the full page, the rest empty.
    alone = render_page([None, items[1], None, None], layout)
    assert alone.crop((96, 0, 192, 96)).tobytes() == page.crop((96, 0, 192, 96)).tobytes()
    assert set(alone.crop((0, 96, 192, 192)).getdata()) == {(255, 255, 255)}
    with pytest.raises(ValueError, match="does not fit"):
        PageLayout(page_size=32, grid=4, margin=4)


def test_a_picture_query_is_the_emoji_as_on_its_page_centred_on_an_empty_one(split):
    train, _ = split
    layout = PageLayout(page_size=192, grid=2, margin=6)
    items = [p["image"] for p in train[:4]]
    page, picture = render_page(items, layout), render_alone(items[3], layout)
    assert picture.size == page.size
    size, offset = 96 - 2 * 6, (192 - 84) // 2  # the emoji's size on the page; centred
    on_page = page.crop((96 + 6, 96 + 6, 96 + 6 + size, 96 + 6 + size))
    assert picture.crop((offset, offset, offset + size, offset + size)).tobytes() == on_page.tobytes()
    assert set(picture.crop((0, 0, 192, offset)).getdata()) == {(255, 255, 255)}


def test_every_query_has_exactly_one_right_page_built_from_held_out_emoji(split):
    train, test = split
    layout = PageLayout()
    round_ = evaluation_set(test, layout, round_seed=3)
    pages = layout_pages(test, layout, 1, 3)
    assert len(round_["pages"]) == len(pages) == len(test) // 4
    train_names = {p["caption"] for p in train}
    names_on = [{p["caption"] for p in page} for page in pages]
    pictures_on = [{picture_png(p["image"], layout) for p in page} for page in pages]
    for query, target, kind in zip(round_["queries"], round_["targets"], round_["kinds"]):
        if kind == "picture":  # the picture of an item of its page
            assert query in pictures_on[target]
            # Another page shows it too only where two held-out emoji render identically (the Australia and Heard &
            # McDonald Islands flags in this Twemoji version): that page then competes, as it should.
            others = [i for i, on in enumerate(pictures_on) if i != target and query in on]
            assert all(
                len({p["caption"] for p in pages[i] + pages[target] if picture_png(p["image"], layout) == query}) == 2
                for i in others
            ), query
            continue
        names = query.split(" and ") if kind == "two items" else [query]
        if kind == "two items" and len(names) != 2:  # a name holding " and " itself: match on the whole query
            names = [n for n in names_on[target] if n in query]
        assert all(n in names_on[target] for n in names), query
        assert not any(all(n in on for n in names) for i, on in enumerate(names_on) if i != target), query
        assert not set(names) & train_names
    assert round_["kinds"].count("one item") == 4 * len(pages)
    assert round_["kinds"].count("two items") == 2 * len(pages)
    assert round_["kinds"].count("picture") == 4 * len(pages)


def test_training_records_batch_within_a_round(split):
    train, _ = split
    records = training_records(train[:40], PageLayout(), rounds=2, seed=0)
    assert len(records) == 20
    assert {r["source"] for r in records} == {"round 0", "round 1"}
    assert all(r["positive"]["image"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n" for r in records)
    for number, record in enumerate(records):  # the pages take turns at the training query kinds
        kind = QUERY_KINDS[number % len(QUERY_KINDS)]
        assert (kind == "picture") == ("image" in record["query"]), record["id"]
        if kind == "picture":
            assert record["query"]["image"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert len(record["query"]["text"].split(" and ")) == (2 if kind == "two items" else 1), record["id"]


def test_memoized_tower_returns_the_towers_outputs_and_computes_each_image_once():
    torch.manual_seed(0)
    tower = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).requires_grad_(False)
    memo = MemoizedTower(tower)
    images = torch.randn(5, 3, 8, 8)
    # Bit for bit against the tower run on the batches the memo runs (the images new to each call, in one batch):
    # a conv kernel may round an image's output differently in a batch of another size.
    first, second = tower(images[:3]), tower(images[3:])
    assert torch.equal(memo(images[[0, 1, 0, 2]]), first[[0, 1, 0, 2]])
    assert memo.computed == 3  # image 0 twice in one call: computed once
    assert torch.equal(memo(images[[2, 3, 1, 4]]), torch.stack([first[2], second[0], first[1], second[1]]))
    assert (memo.calls, memo.computed) == (8, 5)
    with pytest.raises(ValueError, match="only a frozen tower"):
        MemoizedTower(nn.Conv2d(3, 4, 3))


def test_memoized_tower_is_swapped_in_and_restored():
    holder = nn.Module()
    holder.vlm = nn.Module()
    holder.vlm.vision_tower = tower = nn.Identity()
    with memoized_tower(holder) as memo:
        assert holder.vlm.vision_tower is memo and memo.tower is tower
    assert holder.vlm.vision_tower is tower


def test_the_projector_is_set_exactly_to_the_closed_form_map():
    torch.manual_seed(0)
    features, targets = torch.randn(200, 6) * 3 + 1, torch.randn(200, 4)
    weight, mean, std, target_mean = ridge_map(features, targets, penalty=1.0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))  # rank 4 = the map's full rank
    kept = set_mlp_to_linear_map(mlp, weight, mean, std, target_mean)
    expected = ((features - mean) / std) @ weight + target_mean
    assert kept == pytest.approx(1.0)
    torch.testing.assert_close(mlp(features), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="Linear -> GELU -> Linear"):
        relu_mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        set_mlp_to_linear_map(relu_mlp, weight, mean, std, target_mean)


def test_items_alone_probe_equals_the_page_whole_when_a_page_holds_one_item(tmp_path):
    # With one item per page, "each item alone in its cell" is the page itself: the probe's two columns must agree
    # exactly (a wrong slot, page order or target in the probe would make them differ).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from probe_vectors import items_alone

    settings = QuickstartSettings(
        page_grid=1,
        image_size=96,
        num_query_vectors=1,
        num_candidate_vectors=2,
        test_pairs=12,
        test_rounds=2,
        show_progress_bar=False,
    )
    model = build_model(settings, tmp_path).eval()
    _, test_pairs = load_data(settings)
    results = items_alone(model, settings, test_pairs, [(1, 1), (1, 2)])
    for budget, by_kind in results.items():
        for kind, (whole, alone) in by_kind.items():
            assert 1 / 12 <= whole <= 1 and abs(whole - alone) < 1e-6, (budget, kind, whole, alone)


def test_the_quickstart_flags_for_the_meta_token_studies_parse_and_reach_the_model(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "quickstart_cli", Path(__file__).parents[1] / "examples/quickstart.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    defaults = cli.parse_settings([])
    assert defaults.meta_positions == "after_content" and defaults.attention_learning_rate is None
    chosen = cli.parse_settings(["--meta-positions", "spread", "--attention-learning-rate", "1e-4"])
    assert chosen.meta_positions == "spread" and chosen.attention_learning_rate == 1e-4
    assert cli.parse_settings(["--attention-learning-rate", "none"]).attention_learning_rate is None
    model = build_model(QuickstartSettings(meta_positions="spread", train_pairs=8), tmp_path)
    assert model.config.meta_positions == "spread"
    # region-anchored candidate meta tokens are the quickstart's default; "none" gives the paper's free ones
    assert defaults.meta_regions == "pyramid" and model.config.meta_regions == "pyramid"
    assert cli.parse_settings(["--meta-regions", "none"]).meta_regions is None
    free = build_model(QuickstartSettings(meta_regions=None, train_pairs=8), tmp_path / "free")
    assert free.config.meta_regions is None


def test_the_capacity_probe_masks_each_meta_token_to_its_region_and_reads_positions(tmp_path):
    # examples/meta_row_capacity.py's measurements on the untrained quickstart model (free meta tokens), 8 pages.
    import io

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from meta_row_capacity import cell_of_token, cell_restricted_mrr, position_readability, tiling

    from metaembed.quickstart.evaluation import held_out_pages

    settings = QuickstartSettings(meta_regions=None, test_pairs=32, test_rounds=1, show_progress_bar=False)
    model = build_model(settings, tmp_path).eval()
    model.set_attn_implementation("eager")
    _, test_pairs = load_data(settings)
    round_ = held_out_pages(test_pairs, settings)[0]
    pages = [Image.open(io.BytesIO(png)) for png in round_["pages"]]
    pictures = [
        (Image.open(io.BytesIO(q)), t)
        for q, t, k in zip(*(round_[x] for x in ("queries", "targets", "kinds")))
        if k == "picture"
    ]
    queries, targets = [q for q, _ in pictures], [t for _, t in pictures]
    grid = int(model.config.vlm_config.num_image_tokens**0.5)
    assert tiling(grid, [1, 2]).sum(1).tolist() == [36, 9, 9, 9, 9]

    plain_queries = model.encode_queries(queries)
    free = cell_restricted_mrr(model, pages, plain_queries, targets, tiling(grid, [1]), layers=6)  # whole image: no-op
    plain = model.similarity(plain_queries, model.encode_candidates(pages), budget=(4, 16))
    from metaembed_training.evaluation import positive_ranks

    expected = float((1.0 / positive_ranks(plain, torch.tensor(targets)).float()).mean())
    assert abs(free["4x16"] - expected) < 1e-6
    cells = torch.stack([cell_of_token(grid, 2) == c for c in range(4)])
    assert cell_restricted_mrr(model, pages, plain_queries, targets, cells, layers=6)["4x16"] != free["4x16"]

    rows = position_readability(model, pages, pages, grid, 2)  # at the input, where each token sits is exact
    assert rows[0]["index accuracy"] > 0.9 and rows[0]["cell accuracy"] > 0.9 and len(rows) == 7
