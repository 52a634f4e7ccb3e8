"""`metaembed.backbones`, kept for code written before it moved to `metaembed.quickstart.backbones`."""

from metaembed.quickstart.backbones import (
    build_litevl,
    efficientnet_lite_weights,
    minilm_path,
    pretrained_efficientnet_lite,
)

__all__ = ["build_litevl", "efficientnet_lite_weights", "minilm_path", "pretrained_efficientnet_lite"]
