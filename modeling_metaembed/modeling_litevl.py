"""LiteVL, a small vision-language backbone: EfficientNet-Lite feature-grid tokens inside a BERT-style encoder.

This file ships inside every checkpoint (remote code): it imports only public torch/transformers APIs. Importing
it registers `LiteVLModel` with `AutoModel`, so `MetaEmbedModel` builds it from its config like any backbone.

Layout of a row: [CLS] [IMG] x (grid*grid) text [SEP]; the projected image features replace the [IMG] embeddings.
"""

import math

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_litevl import EFFICIENTNET_LITE_STAGES, EfficientNetLiteConfig, LiteVLConfig


class FrozenBatchNorm2d(nn.Module):
    """Batch norm that always uses its running statistics: an image's features never depend on the rest of its
    batch, in training as in inference (small contrastive batches would make batch statistics noisy)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding (extra pixel at the bottom/right), as the weights were trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return nn.functional.conv2d(nn.functional.pad(x, pads), self.weight, self.bias, self.stride, 0, 1, self.groups)


class MBConvBlock(nn.Module):
    """Inverted bottleneck: 1x1 expansion, depthwise kxk, 1x1 projection; ReLU6; residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int, eps: float):
        super().__init__()
        hidden = in_channels * expansion
        if expansion != 1:
            self.expand_conv = SameConv2d(in_channels, hidden, 1, bias=False)
            self.bn0 = FrozenBatchNorm2d(hidden, eps)
        self.depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self.bn1 = FrozenBatchNorm2d(hidden, eps)
        self.project_conv = SameConv2d(hidden, out_channels, 1, bias=False)
        self.bn2 = FrozenBatchNorm2d(out_channels, eps)
        self.residual = stride == 1 and in_channels == out_channels
        self.activation = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "expand_conv"):
            out = self.activation(self.bn0(self.expand_conv(out)))
        out = self.activation(self.bn1(self.depthwise_conv(out)))
        out = self.bn2(self.project_conv(out))
        return out + x if self.residual else out


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding: scale, round to a multiple of `divisor`, never below 90% of the target."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class LiteVLPreTrainedModel(PreTrainedModel):
    config_class = LiteVLConfig
    base_model_prefix = "litevl"
    supports_gradient_checkpointing = False
    # The attention is the text encoder's (BERT: eager or sdpa); the vision tower has none, so any choice suits it.
    _supports_sdpa = True
    _no_split_modules = ["BertLayer", "MBConvBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, FrozenBatchNorm2d):
            module.weight.fill_(1.0)
            module.bias.zero_()
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


class EfficientNetLite(LiteVLPreTrainedModel):
    """EfficientNet-Lite up to its head: images [N, 3, S, S] -> feature grid [N, hidden_size, S/32, S/32]."""

    config_class = EfficientNetLiteConfig
    main_input_name = "pixel_values"

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        eps = config.batch_norm_eps
        self.conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)  # the Lite stem is not scaled
        self.bn0 = FrozenBatchNorm2d(32, eps)
        blocks, last = [], len(EFFICIENTNET_LITE_STAGES) - 1
        for index, (repeats, kernel, stride, expansion, c_in, c_out) in enumerate(EFFICIENTNET_LITE_STAGES):
            c_in = 32 if index == 0 else round_channels(c_in, config.width_coefficient)
            c_out = round_channels(c_out, config.width_coefficient)
            if 0 < index < last:  # the first and last stages keep their depth in the Lite variants
                repeats = int(math.ceil(config.depth_coefficient * repeats))
            for repeat in range(repeats):
                first = repeat == 0
                blocks.append(
                    MBConvBlock(c_in if first else c_out, c_out, kernel, stride if first else 1, expansion, eps)
                )
        self.blocks = nn.ModuleList(blocks)
        self.conv_head = SameConv2d(c_out, config.hidden_size, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(config.hidden_size, eps)
        self.activation = nn.ReLU6()
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # channels_last runs the depthwise convolutions 1.5-3x faster on CPU (measured); the values are the same.
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        x = self.activation(self.bn0(self.conv_stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.activation(self.bn1(self.conv_head(x)))


class LiteVLModel(LiteVLPreTrainedModel):
    """Image features of an EfficientNet-Lite, projected by a two-layer MLP, take the place of the [IMG] tokens
    in a BERT-style encoder's input; returns the encoder's last-layer states."""

    def __init__(self, config: LiteVLConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.vision_tower = EfficientNetLite(config.vision_config)
        self.projector = nn.Sequential(
            nn.Linear(config.vision_config.hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] images -> [N, grid*grid, hidden] token embeddings (row-major over the grid)."""
        grid = self.vision_tower(pixel_values.to(self.projector[0].weight.dtype))  # [N, C, g, g]
        return self.projector(grid.flatten(2).transpose(1, 2))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        embeddings = self.get_input_embeddings()(input_ids)  # [B, L, H]
        is_image = input_ids == self.config.image_token_id  # [B, L]
        expected = 0 if pixel_values is None else pixel_values.shape[0] * self.config.num_image_tokens
        if int(is_image.sum()) != expected:
            raise ValueError(
                f"the batch holds {int(is_image.sum())} image tokens but its {0 if pixel_values is None else len(pixel_values)} "
                f"image(s) need {expected} ({self.config.num_image_tokens} each): build inputs with the LiteVL processor"
            )
        if pixel_values is not None:
            features = self.image_features(pixel_values).to(embeddings.dtype)  # [N, T, H]
            embeddings = embeddings.masked_scatter(is_image.unsqueeze(-1), features)
        kwargs.pop("use_cache", None)
        return self.language_model(
            inputs_embeds=embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            **kwargs,
        )


AutoModel.register(LiteVLConfig, LiteVLModel, exist_ok=True)

__all__ = ["EfficientNetLite", "LiteVLModel", "LiteVLPreTrainedModel"]
