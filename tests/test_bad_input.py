"""Every bad input gets a ValueError naming the offending item; nothing partial comes back."""

import pytest
import torch
from PIL import Image

from modeling_metaembed import maxsim
from tests.conftest import random_image


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("qwen2_5_vl")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("", "item 1: text is empty"),
        ("   \n", "item 1: text is empty"),
        (None, "item 1: is None"),
        ({}, "item 1: a dict needs a 'text' or an 'image'"),
        ({"text": None, "image": None}, "item 1: a dict needs"),
        ({"txt": "x"}, "item 1: unknown keys"),
        ({"text": ""}, "item 1: text is empty"),
        (3.5, "item 1: expected a str"),
        ({"image": 7}, "item 1: image must be a PIL"),
        ("missing.png", "item 1: no image file"),
        (Image.new("RGB", (0, 0)), "item 1: image is zero-sized"),
        ({"text": "caption", "image": Image.new("RGB", (5, 0))}, "item 1: image is zero-sized"),
        ("text with <|meta_query_0|> inside", "item 1: text contains a MetaEmbed meta token"),
    ],
)
def test_bad_items_name_their_index(model, bad, message):
    with pytest.raises(ValueError, match=message):
        model.encode(["fine text", bad])


def test_unreadable_and_corrupt_image_files(model, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match="item 2: cannot read image"):
        model.encode(["ok", random_image(), str(corrupt)])
    truncated = tmp_path / "truncated.jpg"
    random_image(64, 64).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="item 0: cannot read image"):
        model.encode([truncated])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1", "I;16"])
def test_other_image_modes_are_converted_not_refused(model, mode):
    image = random_image(50, 40, seed=4).convert(mode) if mode != "I;16" else Image.new("I;16", (50, 40), 300)
    embeddings = model.encode([image, {"text": "caption", "image": image}])
    assert embeddings.shape[0] == 2 and torch.isfinite(embeddings).all()


def test_transparent_pixels_are_shown_on_white(model):
    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # black, fully transparent
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    assert torch.equal(model.encode([transparent]), model.encode([white]))


def test_huge_image_is_resized_under_the_cap(tiny_model):
    capped = tiny_model("qwen2_5_vl", max_image_tokens=8)
    processor = capped.processor
    batch = processor([Image.new("RGB", (6000, 4000), (10, 200, 30))])
    visual_tokens = int(batch["image_grid_thw"].prod(dim=-1).sum()) // processor.processor.image_processor.merge_size**2
    assert 1 <= visual_tokens <= 8
    assert capped.encode([Image.new("RGB", (6000, 4000))]).shape[0] == 1


def test_image_into_text_only_backbone(tiny_model):
    with pytest.raises(ValueError, match="item 1: has an image but this MetaEmbed backbone .* is text-only"):
        tiny_model("qwen3").encode(["text", random_image()])


@pytest.mark.parametrize("num_vectors", [0, 9, -1, 2.0, "4", True])
def test_num_vectors_validated(model, num_vectors):
    with pytest.raises(ValueError, match="num_vectors"):
        model.encode(["text"], num_vectors=num_vectors)


def test_num_vectors_bounded_by_role(model):
    assert model.encode_candidates(["t"], num_vectors=8).shape[1] == 8
    with pytest.raises(ValueError, match="outside 1..4, the number of query vectors"):
        model.encode_queries(["t"], num_vectors=8)


def test_unknown_role_and_bad_batch_size(model):
    with pytest.raises(ValueError, match="unknown role 'document'"):
        model.encode(["text"], role="document")
    with pytest.raises(ValueError, match="batch_size"):
        model.encode(["text"], batch_size=0)
    with pytest.raises(ValueError, match="inputs must be a list"):
        model.encode(42)


def test_budget_larger_than_tensors(model):
    queries, candidates = model.encode_queries(["q"]), model.encode_candidates(["c"], num_vectors=2)
    with pytest.raises(ValueError, match="r_c=4 is outside 1..2"):
        model.similarity(queries, candidates, budget=(1, 4))
    with pytest.raises(ValueError, match="r_q=5 is outside 1..4"):
        maxsim(queries, candidates, budget=(5, 1))


@pytest.mark.parametrize(
    "family, bad, message",
    [
        ("qwen2_5_vl", "", "item 40: text is empty"),
        ("qwen2_5_vl", "<|meta_candidate_3|>", "item 40: text contains a MetaEmbed meta token"),
    ],
)
def test_nothing_is_encoded_before_a_late_bad_item(tiny_model, monkeypatch, family, bad, message):
    model = tiny_model(family)
    calls = []
    original = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with pytest.raises(ValueError, match=message):
        # longer texts sort first, so the short bad item would be in the last batch
        model.encode(["a fine and rather long text"] * 40 + [bad], batch_size=4)
    assert calls == []  # validated up front: no compute wasted, no partial output
