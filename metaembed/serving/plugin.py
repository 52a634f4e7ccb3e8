"""What vLLM loads from this package, in every one of its processes (entry points in pyproject.toml).

`register()` (group `vllm.general_plugins`) teaches vLLM to read a MetaEmbed checkpoint: its `config.json`
(model_type "metaembed", a backbone config nested in `vlm_config`) is read as the backbone's own config, which
vLLM's backbone code expects, with the MetaEmbed settings attached as `config.metaembed` and the architecture set to
one of the model classes in `metaembed.serving.model`. No remote code runs inside vLLM.

`io_processor()` (group `vllm.io_processor_plugins`) names the request processor the server uses for `/pooling`
requests with a `data` field (raw items: text, base64 images, role, instruction; see `io_processor`).
"""

import os

from .torchvision_ops import define_missing_ops
from .vllm_version import check_vllm_version

# Backbone families vLLM can serve as a MetaEmbed pooling model: model_type -> (architecture, vLLM model class).
SERVED_FAMILIES = {
    "qwen2_5_vl": ("MetaEmbedQwen2_5_VL", "metaembed.serving.model:MetaEmbedQwen2_5_VL"),
    "qwen2_vl": ("MetaEmbedQwen2VL", "metaembed.serving.model:MetaEmbedQwen2VL"),
    "qwen3_vl": ("MetaEmbedQwen3VL", "metaembed.serving.model:MetaEmbedQwen3VL"),
    "qwen3": ("MetaEmbedQwen3", "metaembed.serving.model:MetaEmbedTextModel"),
    "qwen2": ("MetaEmbedQwen2", "metaembed.serving.model:MetaEmbedTextModel"),
    "llama": ("MetaEmbedLlama", "metaembed.serving.model:MetaEmbedTextModel"),
}
# Not served, and why (the README's table says the same).
NOT_SERVED = {
    "litevl": "a backbone that ships with MetaEmbed, unknown to vLLM",
    "bert": "bidirectional encoder: queries need the full [content; M_q; M_c] layout, which vLLM's pooling runner "
    "does not give a decoder-style prompt",
    "paligemma": "its prefix-LM attention (bidirectional over the prompt) is not MetaEmbed's layout in vLLM",
    "mllama": "encoder-decoder cross-attention model, refused by vLLM's pooling runner",
}
IO_PROCESSOR_NAME = "metaembed"


def backbone_config(config_dict: dict, **kwargs):
    """The backbone's transformers config of a MetaEmbed `config.json`, with `metaembed` settings attached."""
    from modeling_metaembed.configuration_metaembed import MetaEmbedConfig

    kwargs.pop("return_unused_kwargs", None)
    kwargs.pop("name_or_path", None)
    config = MetaEmbedConfig.from_dict(dict(config_dict))
    family = config.vlm_config.model_type
    if family not in SERVED_FAMILIES:
        reason = NOT_SERVED.get(family, "no vLLM model class for this backbone here")
        raise ValueError(
            f"MetaEmbed checkpoints on a {family} backbone cannot be served by vLLM: {reason}. "
            "Encode them with model.encode or `metaembed encode` (sharded under torchrun)."
        )
    if config.pooling != "meta_tokens" or config.query_layout != "query_only":
        raise ValueError(
            f"vLLM serves MetaEmbed's meta-token pooling with the query_only layout, not pooling="
            f"{config.pooling!r} / query_layout={config.query_layout!r}"
        )
    backbone = config.vlm_config
    backbone.architectures = [SERVED_FAMILIES[family][0]]
    backbone.metaembed = {
        "query_meta_token_ids": list(config.query_meta_token_ids),
        "candidate_meta_token_ids": list(config.candidate_meta_token_ids),
        "embedding_dim": config.embedding_dim,
        "hidden_size": config.backbone_hidden_size,
        "max_image_tokens": config.max_image_tokens,
    }
    backbone.io_processor_plugin = IO_PROCESSOR_NAME
    return backbone


def _config_class():
    from transformers import PreTrainedConfig

    class MetaEmbedServingConfig(PreTrainedConfig):
        """Registered under model_type "metaembed": loading returns the backbone's config (see module docstring)."""

        model_type = "metaembed"

        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            return backbone_config(config_dict, **kwargs)

    return MetaEmbedServingConfig


def register() -> None:
    """Entry point of `vllm.general_plugins`: the config reader and the model classes."""
    import vllm

    check_vllm_version(vllm.__version__)  # before any of vLLM's private names is touched
    define_missing_ops()
    from .vllm_api import ModelRegistry, register_config

    register_config("metaembed", _config_class())
    for architecture, qualname in SERVED_FAMILIES.values():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, qualname)
    os.environ.setdefault("METAEMBED_VLLM_PLUGIN", "1")


def io_processor() -> str:
    """Entry point of `vllm.io_processor_plugins`: the class that turns raw items into prompts."""
    return "metaembed.serving.io_processor.MetaEmbedIOProcessor"


__all__ = ["register", "io_processor", "backbone_config", "SERVED_FAMILIES", "NOT_SERVED"]
