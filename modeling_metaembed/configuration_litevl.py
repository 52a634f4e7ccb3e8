"""Configuration of LiteVL, a small vision-language backbone: an EfficientNet-Lite image encoder whose feature grid
becomes tokens of a BERT-style text encoder (the quickstart builds one from MiniLM and EfficientNet-Lite0 weights).

This file ships inside every checkpoint (remote code): it imports only public transformers APIs. Importing it
registers both configurations with `AutoConfig`, so a MetaEmbed config naming a LiteVL backbone can rebuild it.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# EfficientNet-Lite's stages (the B0 layout without squeeze-excitation): repeats, kernel, stride, expansion,
# input channels, output channels. Wider and deeper variants scale these by the width and depth coefficients.
EFFICIENTNET_LITE_STAGES = [
    [1, 3, 1, 1, 32, 16],
    [2, 3, 2, 6, 16, 24],
    [2, 5, 2, 6, 24, 40],
    [3, 3, 2, 6, 40, 80],
    [3, 5, 1, 6, 80, 112],
    [4, 5, 2, 6, 112, 192],
    [1, 3, 1, 6, 192, 320],
]
# (width coefficient, depth coefficient, training resolution) of the published variants.
EFFICIENTNET_LITE_VARIANTS = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
    "lite3": (1.2, 1.4, 280),
    "lite4": (1.4, 1.8, 300),
}


class EfficientNetLiteConfig(PreTrainedConfig):
    r"""
    EfficientNet-Lite (ReLU6, no squeeze-excitation, fixed stem and head; TensorFlow "SAME" padding).

    Args:
        width_coefficient (`float`): channel multiplier of the stages (stem and head stay fixed).
        depth_coefficient (`float`): repeat multiplier of the middle stages.
        image_size (`int`): the square input resolution; the feature grid is image_size / 32 per side.
        hidden_size (`int`, defaults to 1280): channels of the head's feature grid.
        batch_norm_eps (`float`): epsilon of the (frozen) batch norms.
    """

    model_type = "efficientnet_lite"

    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    image_size: int = 224
    hidden_size: int = 1280
    batch_norm_eps: float = 1e-3
    initializer_range: float = 0.02

    @classmethod
    def from_variant(cls, variant: str, **kwargs) -> "EfficientNetLiteConfig":
        if variant not in EFFICIENTNET_LITE_VARIANTS:
            raise ValueError(
                f"unknown EfficientNet-Lite variant {variant!r}; known: {sorted(EFFICIENTNET_LITE_VARIANTS)}"
            )
        width, depth, size = EFFICIENTNET_LITE_VARIANTS[variant]
        return cls(**{"width_coefficient": width, "depth_coefficient": depth, "image_size": size, **kwargs})

    @property
    def grid_size(self) -> int:
        """Feature-grid side: the network halves the resolution five times (TF "SAME" rounds up)."""
        side = self.image_size
        for _ in range(5):
            side = -(-side // 2)
        return side


class LiteVLConfig(PreTrainedConfig):
    r"""
    LiteVL: image features of an EfficientNet-Lite, projected by a two-layer MLP, replace the image placeholder
    tokens of a BERT-style text encoder's input (one token per cell of the feature grid).

    Args:
        text_config (`dict` or `PreTrainedConfig`): the text encoder's configuration (a BERT-style encoder).
        vision_config (`dict` or `EfficientNetLiteConfig`): the image encoder's configuration.
        image_token_id (`int`): id of the image placeholder token in the text encoder's vocabulary.
    """

    model_type = "litevl"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "vision_config": SubConfigSpec(config_class=EfficientNetLiteConfig),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    initializer_range: float = 0.02

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image: one per cell of the vision feature grid."""
        return self.vision_config.grid_size**2


# exist_ok: the same classes are registered again when a checkpoint's copy of this file is imported.
AutoConfig.register("efficientnet_lite", EfficientNetLiteConfig, exist_ok=True)
AutoConfig.register("litevl", LiteVLConfig, exist_ok=True)

__all__ = ["EfficientNetLiteConfig", "LiteVLConfig"]
