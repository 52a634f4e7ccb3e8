"""Every vLLM name the plugin uses, in one place: what to read (and change) when vLLM changes.

Importing this module checks vLLM's version first (`vllm_version`): the private names below are known
to work on the tested versions only. Public API: `LLM`, `PoolerConfig`, `PoolingParams`, `ModelRegistry`,
`IOProcessor`, `VllmConfig`, the model-executor helpers. Private (no stability promise from vLLM):
`_CONFIG_REGISTRY` (a model_type's config class), a multimodal model class's `_processor_factory`, the token
poolers under `pooler.tokwise`, and the engine core reached by `shutdown_engine`.
"""

import vllm

from .vllm_version import check_vllm_version

check_vllm_version(vllm.__version__)

from vllm import LLM, ModelRegistry
from vllm.config import PoolerConfig, VllmConfig
from vllm.model_executor.layers.pooler import PoolingParamsUpdate
from vllm.model_executor.layers.pooler.tokwise.methods import AllPool  # private module
from vllm.model_executor.layers.pooler.tokwise.poolers import TokenPooler  # private module
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.plugins.io_processors.interface import IOProcessor
from vllm.pooling_params import PoolingParams


def register_config(model_type: str, config_class) -> None:
    """Make vLLM read `config.json` files of `model_type` with `config_class` (private registry)."""
    from vllm.transformers_utils import config as vllm_config

    vllm_config._CONFIG_REGISTRY[model_type] = config_class


def processor_factories(model_class):
    """The multimodal processor factories (info, processor, dummy_inputs) a vLLM model class registered with."""
    return model_class._processor_factory


def decoder_backbone(family: str):
    """vLLM's decoder-only language model class (no head) of a transformers model_type."""
    if family == "qwen3":
        from vllm.model_executor.models.qwen3 import Qwen3Model

        return Qwen3Model
    if family == "qwen2":
        from vllm.model_executor.models.qwen2 import Qwen2Model

        return Qwen2Model
    if family == "llama":
        from vllm.model_executor.models.llama import LlamaModel

        return LlamaModel
    raise ValueError(f"no vLLM decoder backbone wired for {family}")


def shutdown_engine(llm) -> None:
    """Stop an offline engine's processes now (`LLM` has no public close in 0.32)."""
    engine = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine is not None:
        engine.shutdown()


__all__ = [
    "LLM",
    "ModelRegistry",
    "PoolerConfig",
    "VllmConfig",
    "PoolingParamsUpdate",
    "AllPool",
    "TokenPooler",
    "default_weight_loader",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "AutoWeightsLoader",
    "WeightsMapper",
    "maybe_prefix",
    "MULTIMODAL_REGISTRY",
    "IOProcessor",
    "PoolingParams",
    "register_config",
    "processor_factories",
    "decoder_backbone",
    "shutdown_engine",
]
