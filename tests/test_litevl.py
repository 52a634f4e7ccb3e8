"""LiteVL, the small real-weights backbone: the EfficientNet-Lite port, the packaged weights, the processor and
the Twemoji data. (The tiny random LiteVL also runs through every cross-family test in test_model.py.)"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from metaembed.quickstart.backbones import build_litevl, efficientnet_lite_weights, pretrained_efficientnet_lite
from metaembed.quickstart.twemoji import DIRECTIONS, retrieval_records, split_pairs, twemoji_pairs
from modeling_metaembed import MetaEmbedModel
from modeling_metaembed.configuration_litevl import EfficientNetLiteConfig
from modeling_metaembed.modeling_litevl import EfficientNetLite
from modeling_metaembed.processing_litevl import LiteVLImageProcessor

GRACE_HOPPER = os.path.join(
    os.path.dirname(__import__("matplotlib").__file__), "mpl-data", "sample_data", "grace_hopper.jpg"
)
MILITARY_UNIFORM = 652  # ImageNet class of the photo of Grace Hopper in uniform


@pytest.fixture(scope="module")
def lite0():
    return pretrained_efficientnet_lite("lite0")


def photo_pixels(size=224):
    return LiteVLImageProcessor(size)([Image.open(GRACE_HOPPER)])["pixel_values"]


@torch.no_grad()
def test_efficientnet_lite_port_equals_the_reference_implementation(lite0):
    reference_package = pytest.importorskip("efficientnet_lite_pytorch", reason="reference implementation (test extra)")
    reference = reference_package.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(efficientnet_lite_weights("lite0"))
    ).eval()
    pixels = photo_pixels()
    ours = lite0(pixels)
    assert ours.shape == (1, 1280, 7, 7)
    torch.testing.assert_close(ours, reference.extract_features(pixels), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_packaged_weights_and_preprocessing_classify_a_real_photo(lite0):
    # The packaged classifier on our features and our preprocessing: a wrong padding, normalisation or weight
    # mapping would not give the photo's class with this margin.
    raw = torch.load(efficientnet_lite_weights("lite0"), map_location="cpu", weights_only=True)
    pooled = lite0(photo_pixels()).mean(dim=(2, 3))
    probabilities = torch.nn.functional.linear(pooled, raw["_fc.weight"], raw["_fc.bias"]).softmax(-1)[0]
    assert probabilities.argmax().item() == MILITARY_UNIFORM
    assert probabilities[MILITARY_UNIFORM] > 0.3


def test_grid_size_follows_tensorflow_same_padding():
    for size, grid in ((224, 7), (160, 5), (64, 2), (100, 4)):
        config = EfficientNetLiteConfig(width_coefficient=0.25, image_size=size, hidden_size=16)
        assert config.grid_size == grid
        assert EfficientNetLite(config)(torch.zeros(1, 3, size, size)).shape[-2:] == (grid, grid)


@pytest.fixture(scope="module")
def real_metaembed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("litevl") / "backbone"
    build_litevl(folder, image_size=64)
    return MetaEmbedModel.from_vlm(folder, num_query_vectors=2, num_candidate_vectors=4)


def test_real_weights_backbone_loads_through_the_metaembed_path(real_metaembed, tmp_path):
    from transformers import AutoModel

    model = real_metaembed
    assert model.config.vlm_config.model_type == "litevl"
    assert model.config.meta_attention == "segments" and model.config.query_layout == "query_only"
    assert model.config.vlm_config.text_config.hidden_size == 384
    inputs = ["a red apple", GRACE_HOPPER, {"text": "an officer", "image": Image.open(GRACE_HOPPER)}]
    model.save_pretrained(tmp_path / "checkpoint")
    reloaded = AutoModel.from_pretrained(tmp_path / "checkpoint", trust_remote_code=True)
    assert type(reloaded).__module__.startswith("transformers_modules")
    for role in ("query", "candidate"):
        torch.testing.assert_close(
            model.encode(inputs, role=role), reloaded.encode(inputs, role=role), atol=1e-5, rtol=0
        )


def test_image_token_count_must_match_the_images(real_metaembed):
    model = real_metaembed
    batch = model.processor([GRACE_HOPPER], role="candidate")
    with pytest.raises(ValueError, match="image tokens"):
        model(**{k: v for k, v in batch.items() if k != "pixel_values"}, role="candidate")
    with pytest.raises(ValueError, match=r"placeholder\(s\) for 2 image"):
        model.processor.processor(text=["[IMG] one"], images=[Image.new("RGB", (8, 8))] * 2)


def test_twemoji_pairs_are_unique_and_the_split_is_fixed():
    pairs = twemoji_pairs()
    assert len(pairs) > 1800
    assert len({p["image"] for p in pairs}) == len(pairs) == len({p["caption"] for p in pairs})
    train, test = split_pairs(pairs)
    assert not {p["id"] for p in train} & {p["id"] for p in test}
    assert 0.15 < len(test) / len(pairs) < 0.25
    assert split_pairs(list(reversed(pairs)))[1] == list(reversed(test))  # membership depends on the id only
    image = Image.open(test[0]["image"])
    assert image.size == (72, 72) and np.asarray(image.convert("RGB")).std() > 0
    for direction in DIRECTIONS:
        record = retrieval_records(test[:1], direction)[0]
        assert record["source"] == direction
        assert ("text" in record["query"]) == (direction == "text-to-image")
