import json

import pytest
import torch
from transformers import AutoModel

from modeling_metaembed import MetaEmbedConfig, MetaEmbedModel
from modeling_metaembed.testing import FAMILIES, VISION_FAMILIES, make_tiny_backbone
from tests.conftest import random_image

TOL = 1e-5  # fp32 max abs difference allowed between an input alone and inside a mixed, padded batch


def mixed_inputs(family):
    texts = ["hello world", "a much longer piece of text, which pads the shorter rows"]
    if family not in VISION_FAMILIES:
        return texts
    return texts + [random_image(90, 60, seed=1), {"text": "a cat", "image": random_image(40, 70, seed=2)}]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("role", ["query", "candidate"])
def test_every_family_encodes_and_is_batch_and_padding_invariant(tiny_model, family, role):
    model = tiny_model(family)
    inputs = mixed_inputs(family)
    batched = model.encode(inputs, role=role)
    full = model.config.num_vectors(role)
    assert batched.shape == (len(inputs), full, model.config.output_dim)
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(len(inputs), full), atol=1e-5, rtol=0)
    alone = torch.cat([model.encode([item], role=role) for item in inputs])
    assert (batched - alone).abs().max() <= TOL
    tokenizer = model.processor.tokenizer
    original_side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "left" if original_side == "right" else "right"
        other_side = model.encode(inputs, role=role)
    finally:
        tokenizer.padding_side = original_side
    assert (batched - other_side).abs().max() <= TOL
    # the inputs differ, so must their embeddings (a constant output would pass the checks above)
    assert (batched[0] - batched[1]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3"])
def test_prefix_property(tiny_model, family):
    model = tiny_model(family)
    inputs = mixed_inputs(family)
    everything = model.encode(inputs)
    for k in (1, 3, model.config.num_candidate_vectors):
        assert torch.equal(model.encode(inputs, num_vectors=k), everything[:, :k])
    queries = model.encode_queries(inputs)
    assert torch.equal(model.encode_queries(inputs, num_vectors=2), queries[:, :2])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "mllama", "qwen3", "litevl"])
def test_causal_query_layout_equals_full_official_layout(tiny_model, family):
    # litevl is bidirectional, but its default meta_attention="segments" hides M_c from M_q as causal attention does
    model = tiny_model(family)
    assert model.config.query_layout == "query_only"
    inputs = mixed_inputs(family)
    short = model.encode_queries(inputs)
    model.config.query_layout = "full"  # [content; M_q; M_c], as the official code encodes queries
    try:
        official = model.encode_queries(inputs)
        ids = model.processor(inputs, role="query")["input_ids"]
        assert all(i in ids for i in model.config.candidate_meta_token_ids)  # the layout really changed
    finally:
        model.config.query_layout = "query_only"
    assert (short - official).abs().max() <= TOL


@pytest.mark.parametrize("family", ["bert", "paligemma"])
def test_bidirectional_families_keep_the_full_layout(tiny_model, family):
    model = tiny_model(family)
    assert model.config.query_layout == "full"
    ids = model.processor(["some text"], role="query")["input_ids"][0].tolist()
    assert all(i in ids for i in model.config.query_meta_token_ids + model.config.candidate_meta_token_ids)


def test_segment_attention_is_what_makes_the_short_query_layout_exact(tiny_model, tmp_path):
    model = tiny_model("litevl")
    inputs = mixed_inputs("litevl")
    for attention, should_match in (("segments", True), ("backbone", False)):
        model.config.meta_attention = attention
        try:
            short = model.encode_queries(inputs)
            model.config.query_layout = "full"
            full = model.encode_queries(inputs)
        finally:
            model.config.query_layout, model.config.meta_attention = "query_only", "segments"
        assert ((short - full).abs().max() <= TOL) == should_match, attention
    with pytest.raises(ValueError, match="segments"):
        MetaEmbedConfig(vlm_config={"model_type": "qwen3"}, meta_attention="segments")


def test_meta_tokens_follow_the_whole_prompt(tiny_model):
    model = tiny_model("qwen2_5_vl")
    config, tokenizer = model.config, model.processor.tokenizer
    ids = model.processor([{"text": "a cat", "image": random_image()}], role="candidate")["input_ids"][0].tolist()
    tail = ids[-(config.num_query_vectors + config.num_candidate_vectors) :]
    assert tail == config.query_meta_token_ids + config.candidate_meta_token_ids
    before = tokenizer.decode(ids[: -len(tail)])
    assert before.endswith("<|im_end|>\n")  # the chat template closed the turn before the meta tokens
    query_ids = model.processor(["a cat"], role="query")["input_ids"][0].tolist()
    assert query_ids[-config.num_query_vectors :] == config.query_meta_token_ids
    assert "Query: a cat" in tokenizer.decode(query_ids)  # the default query instruction
    custom = model.processor(["a cat"], role="query", instruction="Find the image: ")["input_ids"][0].tolist()
    assert "Find the image: a cat" in tokenizer.decode(custom)


def test_instruction_changes_query_embedding(tiny_model):
    model = tiny_model("qwen3")
    plain = model.encode_queries(["a cat"])
    instructed = model.encode_queries(["a cat"], instruction="Retrieve a photo: ")
    assert (plain - instructed).abs().max() > 1e-3


def test_similarity_is_maxsim_at_budget(tiny_model):
    model = tiny_model("qwen2_5_vl")
    queries = model.encode_queries(["a cat", "a dog"])
    candidates = model.encode_candidates(["cats", random_image(), "dogs"])
    full = model.similarity(queries, candidates)
    manual = torch.einsum("aid,bjd->abij", queries, candidates).amax(-1).sum(-1)
    torch.testing.assert_close(full, manual, atol=1e-5, rtol=0)
    small = model.similarity(queries, candidates, budget=(1, 1))
    torch.testing.assert_close(small, torch.einsum("ad,bd->ab", queries[:, 0], candidates[:, 0]), atol=1e-6, rtol=0)


def test_default_config_matches_the_paper():
    config = MetaEmbedConfig()
    assert (config.num_query_vectors, config.num_candidate_vectors) == (16, 64)
    assert config.matryoshka_groups == [[1, 1], [2, 4], [4, 8], [8, 16], [16, 64]]
    assert config.embedding_dim is None and config.max_image_tokens == 1024
    assert config.vlm_config.model_type == "qwen2_5_vl" and config.query_layout == "query_only"
    restored = MetaEmbedConfig.from_dict(config.to_dict())
    assert restored.matryoshka_groups == config.matryoshka_groups
    assert restored.vlm_config.to_dict() == config.vlm_config.to_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"matryoshka_groups": [[1, 1], [32, 64]]}, "outside"),
        ({"num_query_vectors": 0}, "positive integer"),
        ({"query_layout": "sideways"}, "query_layout"),
        ({"padding_side": "middle"}, "padding_side"),
        ({"default_instructions": {"query": ""}}, "no entry for role"),
    ],
)
def test_config_rejects_inconsistent_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetaEmbedConfig(**kwargs)


def test_from_vlm_keeps_backbone_weights_and_draws_distinct_meta_rows(tmp_path):
    backbone_dir = make_tiny_backbone(tmp_path / "backbone", family="qwen2_5_vl")
    original = AutoModel.from_pretrained(backbone_dir).state_dict()
    model = MetaEmbedModel.from_vlm(backbone_dir, num_query_vectors=4, num_candidate_vectors=8, embedding_dim=32)
    state = model.vlm.state_dict()
    embed_key = "language_model.embed_tokens.weight"
    assert set(state) == set(original)
    for key, value in original.items():
        if key != embed_key:
            assert torch.equal(state[key], value), key
    old_rows = original[embed_key].shape[0]
    assert torch.equal(state[embed_key][:old_rows], original[embed_key])  # existing rows untouched
    meta_ids = model.config.query_meta_token_ids + model.config.candidate_meta_token_ids
    assert min(meta_ids) >= old_rows and state[embed_key].shape[0] == max(meta_ids) + 1
    meta = state[embed_key][meta_ids]
    # random rows at the scale of the existing ones, not copies of the mean
    assert torch.cdist(meta, meta).fill_diagonal_(float("inf")).min() > 0.1 * meta.norm(dim=-1).mean()
    ratio = meta.std() / original[embed_key].std()
    assert 0.5 < ratio < 2.0
    assert model.config.output_dim == 32 and model.encode(["x"]).shape == (1, 8, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_fresh_from_from_vlm_embeds_as_its_saved_checkpoint(tmp_path, family):
    # Regression: building the composite config once reset the backbone's attention implementation to None,
    # and the fresh (training) model then attended without a causal mask while the saved one did not.
    backbone_dir = make_tiny_backbone(tmp_path / "backbone", family=family)
    model = MetaEmbedModel.from_vlm(backbone_dir, num_query_vectors=4, num_candidate_vectors=8).eval()
    assert model.vlm.config._attn_implementation == AutoModel.from_pretrained(backbone_dir).config._attn_implementation
    model.save_pretrained(tmp_path / "saved")
    reloaded = MetaEmbedModel.from_pretrained(tmp_path / "saved")
    inputs = ["a short text", "a longer text with several more words in it"]
    for role in ("query", "candidate"):
        torch.testing.assert_close(
            model.encode(inputs, role=role), reloaded.encode(inputs, role=role), atol=1e-5, rtol=0
        )


def test_save_pretrained_writes_a_self_contained_hub_folder(tiny_checkpoint):
    folder = tiny_checkpoint("qwen2_5_vl")
    files = {path.name for path in folder.iterdir()}
    code = {
        "configuration_metaembed.py",
        "modeling_metaembed.py",
        "processing_metaembed.py",
        "scoring_metaembed.py",
        "hub_metaembed.py",
        "configuration_litevl.py",
        "modeling_litevl.py",
        "processing_litevl.py",
        "sentence_metaembed.py",
    }
    assert code <= files and "model.safetensors" in files and "tokenizer.json" in files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_metaembed.MetaEmbedConfig",
        "AutoModel": "modeling_metaembed.MetaEmbedModel",
    }
    assert config["query_meta_token_ids"] and config["vlm_config"]["model_type"] == "qwen2_5_vl"
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_metaembed.MetaEmbedProcessor"}
    assert processor_config["backbone_processor_class"] == "Qwen2_5_VLProcessor"


def test_shipped_code_imports_only_public_torch_transformers_pil(tiny_checkpoint):
    import ast

    # huggingface_hub is transformers' own Hub client (push_to_hub); sentence-transformers only in its module.
    stdlib = {"json", "math", "os", "pathlib", "tempfile", "dataclasses", "__future__", "hashlib", "warnings"}
    common = {"torch", "transformers", "PIL", "huggingface_hub"} | stdlib
    extra = {"sentence_metaembed.py": {"sentence_transformers"}}
    folder = tiny_checkpoint("qwen2_5_vl")
    assert (folder / "sentence_metaembed.py").exists() and (folder / "reasoning_metaembed.py").exists()
    for path in folder.glob("*.py"):
        allowed = common | extra.get(path.name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # flat sibling import: must be another shipped file
                    assert (folder / f"{node.module}.py").exists(), (path.name, node.module)
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (path.name, roots)


def visual_tokens_of_a_large_image(model) -> int:
    processor = model.processor
    batch = processor([random_image(width=600, height=600)])
    return int(batch["image_grid_thw"].prod(dim=-1).sum()) // processor.processor.image_processor.merge_size**2


def test_the_image_cap_can_be_raised_after_a_save(tiny_checkpoint, tmp_path):
    """The cap lives in config.max_image_tokens; the saved image processor keeps the backbone's own limit, so a
    checkpoint saved with a small cap loads with a larger one (before: the saved size only ever went down)."""
    small = MetaEmbedModel.from_pretrained(tiny_checkpoint("qwen2_5_vl", max_image_tokens=4))
    assert visual_tokens_of_a_large_image(small) <= 4
    small.save_pretrained(tmp_path / "saved")
    assert visual_tokens_of_a_large_image(small) <= 4  # saving does not change the live processor
    full = visual_tokens_of_a_large_image(MetaEmbedModel.from_pretrained(tiny_checkpoint("qwen2_5_vl")))
    assert full > 4
    raised = MetaEmbedModel.from_pretrained(tmp_path / "saved", max_image_tokens=1024)
    assert raised.config.max_image_tokens == 1024
    assert visual_tokens_of_a_large_image(raised) == full
    again = MetaEmbedModel.from_pretrained(tmp_path / "saved")
    assert visual_tokens_of_a_large_image(again) <= 4  # the saved config still caps it


def test_spread_meta_positions_place_meta_tokens_over_the_content_and_round_trip(tmp_path):
    backbone_dir = make_tiny_backbone(tmp_path / "backbone", family="litevl")
    model = MetaEmbedModel.from_vlm(backbone_dir, num_query_vectors=2, num_candidate_vectors=4).eval()
    inputs = mixed_inputs("litevl")
    after = model.encode(inputs)
    model.config.meta_positions = "spread"
    spread = model.encode(inputs)
    assert (after - spread).abs().max() > 1e-3  # the positions reach the backbone
    # meta token j of a segment of R takes the position of content token floor((2j + 1) C / 2R)
    batch = model.processor(inputs, role="candidate")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    counted = (mask.long().cumsum(-1) - 1).clamp(min=0)
    positions = model._spread_meta_positions(ids, mask, counted)
    for row in range(ids.shape[0]):
        for role_ids in (model.config.query_meta_token_ids, model.config.candidate_meta_token_ids):
            where = [ids[row].tolist().index(i) for i in role_ids]
            first_meta = min(
                ids[row].tolist().index(i)
                for i in model.config.query_meta_token_ids + model.config.candidate_meta_token_ids
            )
            content = first_meta - int(mask[row].long().argmax())
            for j, position in enumerate(where):
                assert int(positions[row, position]) == (2 * j + 1) * content // (2 * len(role_ids))
    # batch and padding invariance hold as for the official positions
    alone = torch.cat([model.encode([item]) for item in inputs])
    assert (spread - alone).abs().max() <= TOL
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["meta_positions"] == "spread"
    reloaded = MetaEmbedModel.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(reloaded.encode(inputs), spread, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="meta_positions"):
        MetaEmbedConfig(vlm_config={"model_type": "qwen3"}, meta_positions="spread")


def test_region_pyramid_tiles_the_grid_level_by_level():
    from modeling_metaembed.modeling_metaembed import region_pyramid

    regions = region_pyramid(6, 16)
    assert regions.shape == (16, 36) and bool(regions[0].all())  # vector 1 reads the whole image
    for level, members in ((2, regions[1:5]), (3, regions[5:14])):
        assert torch.equal(members.sum(0), torch.ones(36, dtype=torch.long))  # each level partitions the grid
        assert all(int(region.sum()) == 36 // level**2 for region in members)
    assert regions[1].view(6, 6)[:3, :3].all() and not regions[1].view(6, 6)[3:].any()  # top-left quadrant
    assert bool(region_pyramid(2, 8)[5:].all())  # past the grid's finest level: the whole image


def test_pyramid_regions_limit_what_each_candidate_meta_token_reads(tmp_path):
    from modeling_metaembed.modeling_metaembed import region_pyramid

    backbone_dir = make_tiny_backbone(tmp_path / "backbone", family="litevl")
    model = MetaEmbedModel.from_vlm(backbone_dir, num_query_vectors=2, num_candidate_vectors=6).eval()
    inputs = mixed_inputs("litevl")
    free = {role: model.encode(inputs, role=role) for role in ("query", "candidate")}
    model.config.meta_regions = "pyramid"
    pyramid = {role: model.encode(inputs, role=role) for role in ("query", "candidate")}
    assert torch.equal(pyramid["query"], free["query"])  # query meta tokens read everything
    assert (pyramid["candidate"] - free["candidate"]).abs().max() > 1e-3  # the regions reach the backbone

    # The mask: candidate meta token k sees the image tokens of region k, and all it saw before otherwise.
    batch = model.processor(inputs, role="candidate")
    ids = batch["input_ids"]
    mask = model._segment_mask(ids, batch["attention_mask"]).squeeze(1)
    model.config.meta_regions = None
    unrestricted = model._segment_mask(ids, batch["attention_mask"]).squeeze(1)
    if mask.dtype != torch.bool:  # eager: additive masks
        mask, unrestricted = mask == 0, unrestricted == 0
    tokens = model.config.vlm_config.num_image_tokens
    regions = region_pyramid(int(tokens**0.5), 6)
    is_image = ids == model.config.vlm_config.image_token_id
    checked = 0
    for row in range(ids.shape[0]):
        images = is_image[row].nonzero().squeeze(-1)
        for k, token in enumerate(model.config.candidate_meta_token_ids):
            where = int((ids[row] == token).nonzero())
            expected = unrestricted[row, where].clone()
            expected[images] &= regions[k].repeat(len(images) // tokens)
            assert torch.equal(mask[row, where], expected)
            checked += len(images) > 0
    assert checked  # some rows hold images

    model.config.meta_regions = "pyramid"
    alone = torch.cat([model.encode([item]) for item in inputs])
    assert (pyramid["candidate"] - alone).abs().max() <= TOL  # batch and padding invariant
    model.save_pretrained(tmp_path / "saved")
    reloaded = MetaEmbedModel.from_pretrained(tmp_path / "saved")
    assert reloaded.config.meta_regions == "pyramid"
    torch.testing.assert_close(reloaded.encode(inputs), pyramid["candidate"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="meta_regions"):
        MetaEmbedConfig(vlm_config={"model_type": "qwen3"}, meta_regions="pyramid")
    with pytest.raises(ValueError, match="meta_regions must be one of"):
        MetaEmbedConfig(vlm_config=model.config.vlm_config.to_dict(), meta_regions="grid")
