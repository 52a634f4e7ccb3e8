"""MetaEmbed as vLLM pooling models: the backbone's vLLM implementation, then the role's meta-token states, the
output projection and L2 normalisation (float32), as `MetaEmbedModel.forward` computes them.

Imported by vLLM only (through `plugin.register`), in the vLLM environment. Each prompt ends with its role's meta
tokens (`requests.build_prompts`): a prompt holding the candidate meta tokens is a candidate (its R_c vectors are
returned), one holding only the query meta tokens a query (R_q vectors). Output per prompt: (R, D) float32.
"""

from collections.abc import Iterable

import torch
from torch import nn

from .vllm_api import (
    MULTIMODAL_REGISTRY,
    AllPool,
    AutoWeightsLoader,
    PoolingParamsUpdate,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    TokenPooler,
    VllmConfig,
    WeightsMapper,
    decoder_backbone,
    default_weight_loader,
    maybe_prefix,
    processor_factories,
)


class MetaTokenPool(AllPool):
    """Each finished prompt's states at its role's meta tokens, in meta-token order: (R, H)."""

    def __init__(self, query_ids: list, candidate_ids: list):
        super().__init__()
        self.query_ids = torch.tensor(query_ids)
        self.candidate_ids = torch.tensor(candidate_ids)

    def get_pooling_updates(self, task) -> PoolingParamsUpdate:
        return PoolingParamsUpdate(requires_token_ids=True)  # the role is read off the prompt's tokens

    def _positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        for role_ids in (self.candidate_ids, self.query_ids):
            matches = token_ids.unsqueeze(-1) == role_ids  # [L, R]
            found = matches.any(dim=0)
            if bool(found.all()):
                return matches.int().argmax(dim=0)  # [R] first occurrence of each meta token
            if bool(found.any()) and role_ids is self.candidate_ids:
                break
        raise ValueError("a prompt lacks its MetaEmbed meta tokens: build requests with metaembed.serving")

    def forward(self, hidden_states: torch.Tensor, pooling_metadata) -> list:
        states = super().forward(hidden_states, pooling_metadata)
        token_ids = pooling_metadata.get_prompt_token_ids_cpu()
        pooled = []
        for data, ids in zip(states, token_ids):
            if data is None:  # a prompt still being prefilled in chunks
                pooled.append(None)
                continue
            # The states cover the prompt's last len(data) tokens (all of them unless a cached prefix was skipped).
            positions = self._positions(ids.cpu()) - (len(ids) - data.shape[0])
            if bool((positions < 0).any()):
                raise RuntimeError(
                    "meta-token states were skipped (a cached prefix covered them): disable prefix caching"
                )
            pooled.append(data[positions.to(data.device)])
        return pooled


class MetaEmbedHead:
    """Output projection (when the checkpoint has one), then float32 L2 normalisation. A plain callable, so the
    projection's parameters are registered once, on the model."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, pooled: list, pooling_metadata) -> list:
        projection = self.model.output_projection
        out = []
        for states in pooled:
            if states is None:
                out.append(None)
                continue
            if projection is not None:
                states = projection(states.to(projection.weight.dtype))
            out.append(nn.functional.normalize(states.float(), p=2, dim=-1))
        return out


class MetaEmbedMixin:
    is_pooling_model = True

    def _init_metaembed(self, vllm_config: VllmConfig) -> None:
        settings = vllm_config.model_config.hf_config.metaembed
        dim, hidden = settings["embedding_dim"], settings["hidden_size"]
        self.output_projection = nn.Linear(hidden, dim) if dim else None
        pooling = MetaTokenPool(settings["query_meta_token_ids"], settings["candidate_meta_token_ids"])
        self.pooler = TokenPooler(pooling=pooling, head=MetaEmbedHead(self))

    def _load_projection(self, weights: Iterable) -> tuple:
        """(backbone weights with the 'vlm.' prefix dropped, names of the projection's loaded parameters)."""
        rest, loaded = [], set()
        for name, weight in weights:
            if name.startswith("output_projection."):
                if self.output_projection is None:
                    raise ValueError(f"the checkpoint has {name} but its config has no embedding_dim")
                default_weight_loader(getattr(self.output_projection, name.split(".", 1)[1]), weight)
                loaded.add(name)
            elif name.startswith("lm_head."):  # a kept language-model head (Think-Then-Embed): not used here
                continue
            else:
                rest.append((name, weight))
        return rest, loaded


class MetaEmbedTextModel(MetaEmbedMixin, nn.Module):
    """A decoder language model backbone (Qwen3, Qwen2, Llama) with MetaEmbed's pooling."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        Backbone = decoder_backbone(vllm_config.model_config.hf_config.model_type)
        self.model = Backbone(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self._init_metaembed(vllm_config)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.model(
            input_ids=input_ids,
            positions=positions,
            intermediate_tensors=intermediate_tensors,
            inputs_embeds=inputs_embeds,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set:
        rest, loaded = self._load_projection(weights)
        backbone = [(name.removeprefix("vlm."), weight) for name, weight in rest]
        return loaded | {f"model.{name}" for name in self.model.load_weights(backbone)}


def _vision_language(base):
    class MetaEmbedVisionLanguage(MetaEmbedMixin, base):
        """A Qwen vision-language backbone (its vLLM class: vision tower, M-RoPE, multimodal processor) with
        MetaEmbed's pooling; the language-model head is never built into the output."""

        hf_to_vllm_mapper = WeightsMapper(
            orig_to_new_prefix={"vlm.language_model.": "language_model.model.", "vlm.visual.": "visual."}
        )

        def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model"):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self._init_metaembed(vllm_config)

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set:
            rest, loaded = self._load_projection(weights)
            loader = AutoWeightsLoader(self)
            loaded |= loader.load_weights(rest, mapper=self.hf_to_vllm_mapper)
            # MetaEmbed checkpoints hold the base model only: the generation head stays unloaded and unused.
            loaded |= {name for name, _ in self.named_parameters() if name.startswith("language_model.lm_head.")}
            return loaded

    # The backbone's multimodal processor, with the image processor capped at the checkpoint's max_image_tokens as
    # MetaEmbedProcessor caps it (the saved preprocessor config keeps the backbone's own, larger limit).
    factories = processor_factories(base)

    class CappedProcessingInfo(factories.info):
        def get_hf_processor(self, **kwargs):
            processor = super().get_hf_processor(**kwargs)
            limit = self.ctx.model_config.hf_config.metaembed["max_image_tokens"]
            cap_image_processor(processor.image_processor, limit)
            return processor

    register = MULTIMODAL_REGISTRY.register_processor(
        factories.processor, info=CappedProcessingInfo, dummy_inputs=factories.dummy_inputs
    )
    return register(MetaEmbedVisionLanguage)


def cap_image_processor(image_processor, max_image_tokens: int) -> None:
    """Lower a Qwen image processor's longest_edge (max pixels) to max_image_tokens merged patches."""
    patch, merge = image_processor.patch_size, image_processor.merge_size
    size = image_processor.size
    longest = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    if longest is None:
        return
    limit = min(longest, max_image_tokens * (patch * merge) ** 2)
    if isinstance(size, dict):
        size["longest_edge"] = limit
    else:
        size.longest_edge = limit


MetaEmbedQwen2_5_VL = type("MetaEmbedQwen2_5_VL", (_vision_language(Qwen2_5_VLForConditionalGeneration),), {})
MetaEmbedQwen2VL = type("MetaEmbedQwen2VL", (_vision_language(Qwen2VLForConditionalGeneration),), {})
MetaEmbedQwen3VL = type("MetaEmbedQwen3VL", (_vision_language(Qwen3VLForConditionalGeneration),), {})

__all__ = ["MetaEmbedTextModel", "MetaEmbedQwen2_5_VL", "MetaEmbedQwen2VL", "MetaEmbedQwen3VL", "MetaTokenPool"]
