"""The LiteVL processor: texts with an [IMG] placeholder per image, plus images, into LiteVL model inputs.

This file ships inside every checkpoint (remote code): it imports only public torch/transformers/PIL APIs and
its flat siblings.
"""

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature
from transformers.utils import cached_file

from .hub_metaembed import HUB_KWARGS, PROCESSOR_CONFIG_NAME, write_atomic

# EfficientNet-Lite was trained on pixels scaled as (x - 127) / 128.
LITE_MEAN, LITE_STD = [127.0 / 255] * 3, [128.0 / 255] * 3


class LiteVLImageProcessor:
    """RGB images -> float32 [N, 3, S, S]: bicubic resize to S x S, scale to [0, 1], normalise per channel."""

    def __init__(self, image_size: int = 224, image_mean=None, image_std=None):
        self.image_size = int(image_size)
        self.image_mean = list(image_mean or LITE_MEAN)
        self.image_std = list(image_std or LITE_STD)

    def __call__(self, images, return_tensors: str = "pt") -> BatchFeature:
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        pixels = []
        for image in images:
            resized = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            array = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)
            tensor = array.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255.0
            pixels.append((tensor - mean) / std)
        return BatchFeature({"pixel_values": torch.stack(pixels)}, tensor_type=return_tensors)

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "image_mean": self.image_mean, "image_std": self.image_std}


class LiteVLProcessor:
    """Tokenizer plus image processor. Each `image_token` in a text stands for one image (in order over the
    batch) and is expanded to `num_image_tokens` copies, one per cell of the vision feature grid."""

    chat_template = None  # plain "[CLS] text [SEP]" prompts

    def __init__(
        self, tokenizer, image_processor: LiteVLImageProcessor, image_token: str = "[IMG]", num_image_tokens: int = 49
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.num_image_tokens = int(num_image_tokens)

    def __call__(self, text=None, images=None, padding=True, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        images = list(images or [])
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(images):
            raise ValueError(
                f"the texts hold {placeholders} {self.image_token} placeholder(s) for {len(images)} image(s)"
            )
        expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in texts]
        batch = dict(self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **kwargs))
        if images:
            batch.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(batch, tensor_type=return_tensors)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        settings = {
            "processor_class": type(self).__name__,
            "image_token": self.image_token,
            "num_image_tokens": self.num_image_tokens,
            **self.image_processor.to_dict(),
        }
        write_atomic(folder / PROCESSOR_CONFIG_NAME, json.dumps(settings, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, config=None, **kwargs) -> "LiteVLProcessor":
        """Load from a LiteVL or MetaEmbed folder (or Hub id); `config` (the LiteVL config) spares the tokenizer
        from reading config.json."""
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        with open(
            cached_file(pretrained_model_name_or_path, PROCESSOR_CONFIG_NAME, **hub_kwargs), encoding="utf-8"
        ) as f:
            settings = json.load(f)
        text_config = getattr(config, "text_config", None)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, config=text_config, **hub_kwargs)
        image_processor = LiteVLImageProcessor(settings["image_size"], settings["image_mean"], settings["image_std"])
        return cls(tokenizer, image_processor, settings["image_token"], settings["num_image_tokens"])


__all__ = ["LiteVLImageProcessor", "LiteVLProcessor"]
