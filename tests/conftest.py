"""Shared fixtures: one tiny checkpoint per backbone family per test session (built offline, copied on demand)."""

import os

# Tests never reach the Hub, and remote code is cached in a throwaway place.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
from PIL import Image

from modeling_metaembed import MetaEmbedModel
from modeling_metaembed.testing import make_tiny_checkpoint


@pytest.fixture(scope="session", autouse=True)
def isolated_hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    previous = os.environ.get("HF_HOME")
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_MODULES_CACHE"] = str(home / "modules")
    yield home
    if previous is not None:
        os.environ["HF_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family, **overrides) -> path of a tiny MetaEmbed checkpoint, built once per session."""
    built = {}

    def build(family="qwen2_5_vl", **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            built[key] = make_tiny_checkpoint(folder, family=family, **overrides)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """tiny_model(family, **overrides) -> a loaded MetaEmbedModel (shared: do not mutate it)."""
    loaded = {}

    def load(family="qwen2_5_vl", **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in loaded:
            loaded[key] = MetaEmbedModel.from_pretrained(tiny_checkpoint(family, **overrides))
        return loaded[key]

    return load


def random_image(width=90, height=60, seed=0, mode="RGB"):
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    return Image.fromarray(pixels).convert(mode)
