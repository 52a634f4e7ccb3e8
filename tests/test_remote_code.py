"""A checkpoint folder must load and run where this package is not importable, as on a user's machine."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_metaembed import MetaEmbedModel
from modeling_metaembed.testing import VISION_FAMILIES
from tests.conftest import random_image

FRESH_PROCESS = textwrap.dedent(
    """
    import sys, importlib.abc

    class BlockPackage(importlib.abc.MetaPathFinder):
        # the checkpoint's own code must be all it takes: the installed package is off limits
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_metaembed", "metaembed", "metaembed_training", "training"):
                raise ImportError(f"{name} must not be imported by remote code")

    sys.meta_path.insert(0, BlockPackage())
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    folder, image_path, out = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == "MetaEmbedProcessor", type(processor)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = ["a query about cats"]
    if image_path != "-":
        inputs += [image_path, {"text": "a caption", "image": Image.open(image_path)}]
    torch.save({"candidates": model.encode(inputs), "queries": model.encode_queries(inputs)}, out)
    """
)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "bert", "litevl"])
def test_fresh_process_loads_with_trust_remote_code_and_embeds_bit_identically(tiny_checkpoint, tmp_path, family):
    folder = tiny_checkpoint(family)
    image_path = "-"
    inputs = ["a query about cats"]
    if family in VISION_FAMILIES:
        image_path = str(tmp_path / "image.png")
        random_image(64, 48, seed=3).save(image_path)
        inputs += [image_path, {"text": "a caption", "image": random_image(64, 48, seed=3)}]
    script, out = tmp_path / "fresh.py", tmp_path / "embeddings.pt"
    script.write_text(FRESH_PROCESS)
    # bit-identical only with this process's thread count: another one splits the float32 sums differently
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run(
        [sys.executable, str(script), str(folder), image_path, str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(out)
    local = MetaEmbedModel.from_pretrained(folder)
    assert torch.equal(remote["candidates"], local.encode(inputs))
    assert torch.equal(remote["queries"], local.encode_queries(inputs))
