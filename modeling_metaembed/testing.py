"""Tiny random MetaEmbed checkpoints, built offline, for tests, docs and users' own CI.

    from modeling_metaembed.testing import make_tiny_checkpoint
    path = make_tiny_checkpoint("/tmp/tiny-metaembed", family="qwen2_5_vl")
    model = AutoModel.from_pretrained(path, trust_remote_code=True)

Each family gets a backbone of a few hundred thousand parameters, a byte-level tokenizer (256 byte symbols plus
the family's special tokens, no merges) with a small chat template where the family has one, and the family's
real processor classes. The backbone is saved as its family's real checkpoint class (the generation model, as
published checkpoints are), then turned into a MetaEmbed through the public `MetaEmbedModel.from_vlm` path.
"""

import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .modeling_metaembed import MetaEmbedModel

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma", "mllama", "qwen3", "bert", "litevl")
VISION_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma", "mllama", "litevl")

# Chat templates in the families' own formats, reduced to what an embedding prompt needs: user turns with text
# and image placeholders, closed turns, no generation prompt.
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAMA_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<|python_tag|>",
    "<|image|>",
]
_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]


def _byte_level_tokenizer(specials: list, **special_roles) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte symbols, then the special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special_roles)
    tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    return tokenizer


def _bert_tokenizer(folder: Path):
    """A WordPiece tokenizer over lowercase characters, digits and punctuation (BERT's format)."""
    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"-()")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + symbols + [f"##{s}" for s in symbols]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizer(str(folder / "vocab.txt"))


# Sizes of the tiny text models; `make_tiny_backbone(text_overrides=...)` changes them (benchmarks use bigger ones).
_TEXT_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def _tiny_text(vocab_size: int, sizes: dict, **extra) -> dict:
    """A tiny decoder text config: hidden 64, 2 layers, 4 heads / 2 KV heads unless `sizes` says otherwise
    (`sizes` may also replace the family's own extras, e.g. head_dim or rope_parameters)."""
    return {"vocab_size": vocab_size, **extra, **sizes}


def _special_ids(tokenizer) -> dict:
    """bos/eos/pad ids of the tokenizer, for the tiny configs (their defaults point into real vocabularies)."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _qwen_vl(family: str, sizes: dict):
    tokenizer = _byte_level_tokenizer(_QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    vocab = len(tokenizer)
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    if family == "qwen3_vl":
        text = _tiny_text(
            vocab,
            sizes,
            **_special_ids(tokenizer),
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )
        config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        model_class, processor_class, patch = (
            transformers.Qwen3VLForConditionalGeneration,
            transformers.Qwen3VLProcessor,
            16,
        )
        video_processor = transformers.Qwen3VLVideoProcessor(patch_size=16)
    else:
        text = _tiny_text(
            vocab,
            sizes,
            **_special_ids(tokenizer),
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        )
        if family == "qwen2_5_vl":
            vision = dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=112,
                out_hidden_size=64,
                fullatt_block_indexes=[1],
            )
            config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
            model_class, processor_class = (
                transformers.Qwen2_5_VLForConditionalGeneration,
                transformers.Qwen2_5_VLProcessor,
            )
        else:
            vision = dict(
                depth=2,
                embed_dim=32,
                hidden_size=64,
                mlp_ratio=2,
                num_heads=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
            )
            config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
            model_class, processor_class = transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLProcessor
        patch = 14
        video_processor = transformers.Qwen2VLVideoProcessor()
    pixels_per_token = (2 * patch) ** 2
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=2,
        size={"shortest_edge": 4 * pixels_per_token, "longest_edge": 16 * pixels_per_token},
    )
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=_QWEN_TEMPLATE,
    )
    return model_class(config), processor


def _paligemma(sizes: dict):
    tokenizer = _byte_level_tokenizer(
        _GEMMA_SPECIALS, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    image_size, patch = 28, 14  # 4 image tokens
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=64,
    )
    text = _tiny_text(len(tokenizer), sizes, **_special_ids(tokenizer), head_dim=16, model_type="gemma")
    config = transformers.PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=64,
        hidden_size=64,
        vocab_size=len(tokenizer),
    )
    image_processor = transformers.SiglipImageProcessor(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch) ** 2
    processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return transformers.PaliGemmaForConditionalGeneration(config), processor


def _mllama(sizes: dict):
    tokenizer = _byte_level_tokenizer(
        _LLAMA_SPECIALS, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>"
    )
    vocab = len(tokenizer)
    image_token = tokenizer.convert_tokens_to_ids("<|image|>")
    text = _tiny_text(
        vocab + 8,
        sizes,
        **_special_ids(tokenizer),
        num_hidden_layers=3,
        cross_attention_layers=[1],
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        image_size=28,
        patch_size=14,
        max_num_tiles=2,
        vision_output_dim=64,
        intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    config = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_token)
    image_processor = transformers.MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=2)
    processor = transformers.MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_LLAMA_TEMPLATE
    )
    return transformers.MllamaForConditionalGeneration(config), processor


def _qwen3(sizes: dict):
    tokenizer = _byte_level_tokenizer(_QWEN_SPECIALS[:3], eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = _QWEN_TEMPLATE
    config = transformers.Qwen3Config(**_tiny_text(len(tokenizer), sizes, **_special_ids(tokenizer), head_dim=16))
    return transformers.Qwen3ForCausalLM(config), tokenizer


def _bert(folder: Path):
    tokenizer = _bert_tokenizer(folder)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    return transformers.BertModel(config, add_pooling_layer=False), tokenizer


def _litevl(folder: Path):
    """A narrow EfficientNet-Lite (width 0.25, 64-channel head) on 64-px images (a 2x2 grid: 4 image tokens)
    inside the tiny BERT."""
    from .configuration_litevl import EfficientNetLiteConfig, LiteVLConfig
    from .modeling_litevl import LiteVLModel
    from .processing_litevl import LiteVLImageProcessor, LiteVLProcessor

    tokenizer = _bert_tokenizer(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[IMG]"]}, replace_extra_special_tokens=False)
    text = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    vision = EfficientNetLiteConfig(width_coefficient=0.25, image_size=64, hidden_size=64)
    config = LiteVLConfig(
        text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids("[IMG]")
    )
    model = LiteVLModel(config)
    with torch.no_grad():  # non-trivial batch-norm statistics, so the frozen norms are exercised
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    processor = LiteVLProcessor(tokenizer, LiteVLImageProcessor(64), "[IMG]", config.num_image_tokens)
    return model, processor


def make_tiny_backbone(path, family: str = "qwen2_5_vl", seed: int = 0, text_overrides: dict | None = None) -> Path:
    """Write a tiny random backbone checkpoint of `family` (weights, config, processor or tokenizer) to `path`,
    in the layout its family's published checkpoints have. `text_overrides` resizes the decoder text model of the
    causal families (hidden_size, intermediate_size, num_hidden_layers, heads; keep hidden_size equal to the
    tiny vision towers' output, 64, for the vision families)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")
    if text_overrides and family in ("bert", "litevl"):
        raise ValueError(f"text_overrides applies to the decoder families, not {family}")
    sizes = {**_TEXT_SIZES, **(text_overrides or {})}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        model, processor = _qwen_vl(family, sizes)
    elif family == "paligemma":
        model, processor = _paligemma(sizes)
    elif family == "mllama":
        model, processor = _mllama(sizes)
    elif family == "qwen3":
        model, processor = _qwen3(sizes)
    elif family == "litevl":
        model, processor = _litevl(path)
    else:
        model, processor = _bert(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_tiny_checkpoint(
    path, family: str = "qwen2_5_vl", seed: int = 0, text_overrides: dict | None = None, **overrides
) -> Path:
    """Write a self-contained tiny MetaEmbed checkpoint (code files, config, weights, processor) of a backbone
    `family` to `path`. `overrides` go to `MetaEmbedModel.from_vlm` (e.g. num_query_vectors=4,
    num_candidate_vectors=8, embedding_dim=32); `text_overrides` to `make_tiny_backbone`. Returns the path."""
    overrides.setdefault("num_query_vectors", 4)
    overrides.setdefault("num_candidate_vectors", 8)
    with tempfile.TemporaryDirectory(prefix=f"tiny-{family}-") as backbone_dir:
        make_tiny_backbone(backbone_dir, family=family, seed=seed, text_overrides=text_overrides)
        model = MetaEmbedModel.from_vlm(backbone_dir, seed=seed, **overrides)
    model.save_pretrained(path)
    return Path(path)


__all__ = ["make_tiny_checkpoint", "make_tiny_backbone", "FAMILIES", "VISION_FAMILIES"]
