"""`metaembed convert`: a tiny checkpoint in the official MetaEmbed key layout (a Qwen2.5-VL with a separate
`prompt_embed_tokens` embedding and `custom_text_proj`, optionally a LoRA adapter over a base) converts into
our format with the embeddings of the official forward."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

from metaembed.hub.convert import ConversionError, convert, official_embeddings, probe_prompts
from modeling_metaembed import MetaEmbedModel
from modeling_metaembed.testing import make_tiny_backbone
from tests.conftest import random_image

R_Q, R_C, DIM = 4, 16, 32


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(backbone folder, official checkpoint folder, its extra weights) in the official key layout."""
    root = tmp_path_factory.mktemp("official")
    backbone = make_tiny_backbone(root / "backbone", family="qwen2_5_vl", seed=3)
    state = load_file(backbone / "model.safetensors")
    hidden = state["model.embed_tokens.weight"].shape[1]
    generator = torch.Generator().manual_seed(7)
    extra = {
        "prompt_embed_tokens.weight": torch.randn(R_Q + R_C, hidden, generator=generator) * 0.05,
        "custom_text_proj.weight": torch.randn(DIM, hidden, generator=generator) * 0.1,
        "custom_text_proj.bias": torch.randn(DIM, generator=generator) * 0.1,
    }
    folder = root / "metaembed-official"
    shutil.copytree(backbone, folder)
    save_file({**state, **extra}, folder / "model.safetensors")
    return backbone, folder, extra


def reference(backbone, extra, inputs, role, converted):
    """The official forward on the original backbone's own weights (not the converted ones)."""
    vlm, processor = AutoModel.from_pretrained(backbone).eval(), AutoProcessor.from_pretrained(backbone)
    prompts, images = probe_prompts(converted, inputs, role)
    projection = {"weight": extra["custom_text_proj.weight"], "bias": extra["custom_text_proj.bias"]}
    return official_embeddings(
        vlm, processor, prompts, images, extra["prompt_embed_tokens.weight"], projection, R_Q, R_C, role
    )


def test_converted_checkpoint_gives_the_official_embeddings(official, tmp_path):
    backbone, folder, extra = official
    difference = convert(folder, tmp_path / "converted", num_query_vectors=R_Q, num_candidate_vectors=R_C)
    assert difference < 1e-5
    converted = AutoModel.from_pretrained(tmp_path / "converted", trust_remote_code=True)  # as a user loads it
    assert converted.config.num_query_vectors == R_Q and converted.config.output_dim == DIM
    inputs = ["what is in this picture", random_image(seed=5), {"text": "a caption", "image": random_image(seed=6)}]
    for role in ("query", "candidate"):
        expected = reference(backbone, extra, inputs, role, converted)
        torch.testing.assert_close(converted.encode(inputs, role=role), expected, atol=1e-5, rtol=0)


def test_lora_adapter_over_a_base_converts_like_the_merged_checkpoint(official, tmp_path):
    backbone, folder, extra = official
    base_state = load_file(folder / "model.safetensors")
    base = tmp_path / "colqwen-base"
    shutil.copytree(folder, base)
    save_file(
        {k: v for k, v in base_state.items() if not k.startswith(("prompt_embed", "custom_text"))},
        base / "model.safetensors",
    )
    # A PEFT adapter in the official run's shape: LoRA on q/v projections, meta rows and projection fully trained.
    generator = torch.Generator().manual_seed(11)
    rank, alpha = 4, 8
    adapter, merged = {}, dict(base_state)
    for layer in (0, 1):
        for name in ("q_proj", "v_proj"):
            module = f"model.layers.{layer}.self_attn.{name}"
            weight = base_state[f"{module}.weight"]
            a = torch.randn(rank, weight.shape[1], generator=generator) * 0.1
            b = torch.randn(weight.shape[0], rank, generator=generator) * 0.1
            adapter[f"base_model.model.{module}.lora_A.weight"] = a
            adapter[f"base_model.model.{module}.lora_B.weight"] = b
            merged[f"{module}.weight"] = weight + (alpha / rank) * b @ a
    for key, value in extra.items():
        adapter[f"base_model.model.{key}"] = value
    adapter_folder = tmp_path / "adapter"
    adapter_folder.mkdir()
    save_file(adapter, adapter_folder / "adapter_model.safetensors")
    (adapter_folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": alpha,
                "base_model_name_or_path": str(base),
                "target_modules": ["q_proj", "v_proj"],
                "modules_to_save": ["prompt_embed_tokens", "custom_text_proj"],
            }
        )
    )
    merged_folder = tmp_path / "merged"
    shutil.copytree(folder, merged_folder)
    save_file(merged, merged_folder / "model.safetensors")

    convert(adapter_folder, tmp_path / "from-adapter", num_query_vectors=R_Q, num_candidate_vectors=R_C)
    convert(merged_folder, tmp_path / "from-merged", num_query_vectors=R_Q, num_candidate_vectors=R_C)
    from_adapter = MetaEmbedModel.from_pretrained(tmp_path / "from-adapter")
    from_merged = MetaEmbedModel.from_pretrained(tmp_path / "from-merged")
    convert(folder, tmp_path / "plain", num_query_vectors=R_Q, num_candidate_vectors=R_C)
    plain = MetaEmbedModel.from_pretrained(tmp_path / "plain")  # the same checkpoint without the LoRA deltas
    texts = ["a query", "another, longer query text"]
    torch.testing.assert_close(
        from_adapter.encode(texts, role="query"), from_merged.encode(texts, role="query"), atol=1e-5, rtol=0
    )
    assert not torch.allclose(from_adapter.encode(texts, role="query"), plain.encode(texts, role="query"), atol=1e-3)


def test_wrong_vector_counts_and_non_official_sources_are_refused(official, tmp_path):
    _, folder, _ = official
    with pytest.raises(ConversionError, match="R_q \\+ R_c = 16 \\+ 64"):
        convert(folder, tmp_path / "out")  # the defaults (16, 64) do not match 20 rows
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="prompt_embed_tokens"):
        convert(official[0], tmp_path / "out2", num_query_vectors=R_Q, num_candidate_vectors=R_C)
