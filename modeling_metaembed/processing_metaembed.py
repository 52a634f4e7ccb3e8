"""Turns user inputs (text, images, both) into MetaEmbed model inputs.

This file ships inside every checkpoint (remote code): it imports only public torch/transformers/PIL APIs.

The processor wraps the backbone's own processor (or tokenizer, for text-only backbones). Per row it builds the
role's prompt (instruction + text, with the image placeholder, through the backbone's chat template where it has
one), appends the role's meta tokens after the whole prompt, and lets the backbone processor expand image tokens,
pad and produce every tensor its model needs (pixel values, image grids, 3-D rope token types, cross-attention
masks). The meta tokens are added special tokens of the backbone vocabulary, so they survive tokenisation as
single ids; the processor checks that they did.
"""

import json
import math
import os
import warnings
from pathlib import Path

import torch
import transformers
from PIL import Image, UnidentifiedImageError

from .configuration_metaembed import MetaEmbedConfig, check_role
from .hub_metaembed import HUB_KWARGS, PROCESSOR_CONFIG_NAME, write_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Pixels per visual token when a backbone has no merge-based image processor (a generous generic bound).
FALLBACK_PIXELS_PER_TOKEN = 28 * 28


class EncodeItem:
    """One validated input: optional text, optional image (a PIL image or a path), its position in the input."""

    __slots__ = ("index", "text", "image")

    def __init__(self, index: int, text, image):
        self.index, self.text, self.image = index, text, image

    @property
    def length_key(self) -> tuple:
        """A cheap proxy of the sequence length, used to sort batches (images first, then by text length)."""
        return (self.image is not None, len(self.text or ""))


def _looks_like_image_path(text: str) -> bool:
    return text.lower().endswith(IMAGE_SUFFIXES) and not any(ch.isspace() for ch in text)


def _check_text(text, index: int):
    if not isinstance(text, str):
        raise ValueError(f"item {index}: text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"item {index}: text is empty or whitespace-only")
    return text


def _check_image_ref(image, index: int):
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"item {index}: image is zero-sized ({image.width}x{image.height})")
        return image
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise ValueError(f"item {index}: no image file at {os.fspath(image)!r}")
        return image
    raise ValueError(
        f"item {index}: image must be a PIL.Image.Image or a path to an image file, got {type(image).__name__}"
    )


def parse_inputs(inputs) -> list:
    """Validate user inputs without decoding images: a list of str, PIL images, image paths, or
    {"text": ..., "image": ...} dicts. A `str` is text unless it is a whitespace-free string ending in an image
    suffix (.png, .jpg, ...), which must then name an existing file; wrap it as {"text": ...} to force text.
    Raises ValueError naming the first offending item's index."""
    if isinstance(inputs, (str, Image.Image, dict, os.PathLike)):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)):
        raise ValueError(f"inputs must be a list of texts, images or dicts, got {type(inputs).__name__}")
    items = []
    for index, raw in enumerate(inputs):
        if raw is None:
            raise ValueError(f"item {index}: is None")
        if isinstance(raw, str):
            if _looks_like_image_path(raw):
                items.append(EncodeItem(index, None, _check_image_ref(raw, index)))
            else:
                items.append(EncodeItem(index, _check_text(raw, index), None))
        elif isinstance(raw, (Image.Image, os.PathLike)):
            items.append(EncodeItem(index, None, _check_image_ref(raw, index)))
        elif isinstance(raw, dict):
            unknown = set(raw) - {"text", "image"}
            if unknown:
                raise ValueError(f"item {index}: unknown keys {sorted(unknown)}; expected 'text' and/or 'image'")
            text, image = raw.get("text"), raw.get("image")
            if text is None and image is None:
                raise ValueError(f"item {index}: a dict needs a 'text' or an 'image'")
            items.append(
                EncodeItem(
                    index,
                    None if text is None else _check_text(text, index),
                    None if image is None else _check_image_ref(image, index),
                )
            )
        else:
            raise ValueError(
                f"item {index}: expected a str, a PIL image, an image path or a dict, got {type(raw).__name__}"
            )
    return items


def load_image(image, index: int, max_pixels: int) -> Image.Image:
    """Decode an image (PIL image or path) into RGB, at most `max_pixels` pixels; errors name the item."""
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as error:
            raise ValueError(f"item {index}: cannot read image {os.fspath(image)!r}: {error}") from error
    if image.width == 0 or image.height == 0:
        raise ValueError(f"item {index}: image is zero-sized ({image.width}x{image.height})")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        # Transparent pixels carry arbitrary colours: show them on white, as a viewer would.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def per_item_instructions(instruction, count: int) -> list:
    """One instruction (or None: the role's default) per item, from a single value or a list."""
    if isinstance(instruction, (list, tuple)):
        if len(instruction) != count:
            raise ValueError(f"got {len(instruction)} instructions for {count} inputs: give one per input")
        for index, value in enumerate(instruction):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"instruction {index} must be a string or None, got {type(value).__name__}")
        return list(instruction)
    if instruction is not None and not isinstance(instruction, str):
        raise ValueError(f"instruction must be a string, a list of strings or None, got {type(instruction).__name__}")
    return [instruction] * count


class MetaEmbedProcessor:
    """Builds MetaEmbed model inputs for a role ("query" or "candidate") from texts, images or both.

    Args:
        processor: the backbone's processor (VLMs) or tokenizer (text-only backbones).
        config: the model's [`MetaEmbedConfig`]: meta tokens, prompt templates, instructions, image cap, padding.
    """

    def __init__(self, processor, config: MetaEmbedConfig):
        self.processor = processor
        self.config = config
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = config.padding_side
        self.family = config.vlm_config.model_type
        self.has_vision = hasattr(processor, "image_processor")
        self.uses_chat_template = getattr(processor, "chat_template", None) is not None
        self.max_image_pixels = config.max_image_tokens * self._pixels_per_visual_token()
        if self.has_vision:
            self._cap_image_processor()
        self._meta_ids = {
            role: self.tokenizer.convert_tokens_to_ids(config.meta_tokens(role)) for role in ("query", "candidate")
        }

    # ----------------------------------------------------------------------------------------------------- images
    def _pixels_per_visual_token(self) -> int:
        image_processor = getattr(self.processor, "image_processor", None)
        patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
        if isinstance(patch, int) and isinstance(merge, int):  # Qwen families: one token per merged patch
            return (patch * merge) ** 2
        return FALLBACK_PIXELS_PER_TOKEN

    def _cap_image_processor(self) -> None:
        """Make the backbone's image processor itself respect the visual-token cap (Qwen: max_pixels). The
        backbone's own limit is kept aside and is what `save_pretrained` writes, so that a later load with a
        larger `max_image_tokens` can raise the cap again (a saved cap would only ever go down)."""
        self._backbone_longest_edge = self._longest_edge()
        if self._backbone_longest_edge is not None:
            self._set_longest_edge(min(self._backbone_longest_edge, self.max_image_pixels))

    def _longest_edge(self):
        """The Qwen-style image processor's `size.longest_edge` (its max_pixels), or None for other families."""
        image_processor = self.processor.image_processor
        size = getattr(image_processor, "size", None)
        longest = getattr(size, "longest_edge", None) if not isinstance(size, dict) else size.get("longest_edge")
        return longest if getattr(image_processor, "merge_size", None) is not None else None

    def _set_longest_edge(self, value) -> None:
        size = self.processor.image_processor.size
        if isinstance(size, dict):
            size["longest_edge"] = value
        else:
            size.longest_edge = value

    # ---------------------------------------------------------------------------------------------------- prompts
    def build_prompt(self, item: EncodeItem, role: str, instruction=None) -> str:
        """The row's prompt (instruction + text, through the chat template if any), before its meta tokens."""
        if instruction is None:
            instruction = self.config.default_instructions[role]
        body = self.config.prompt_templates[role].format(instruction=instruction, text=item.text or "")
        if self.uses_chat_template:
            if self.has_vision:
                content = ([{"type": "image"}] if item.image is not None else []) + (
                    [{"type": "text", "text": body}] if body else []
                )
            else:
                content = body
            prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        elif self.has_vision and item.image is not None and self.family != "paligemma":
            prompt = self.processor.image_token + body  # no chat template: the image placeholder leads the text
        else:
            prompt = body
        return prompt

    def check_items(self, items: list) -> None:
        """Checks that need this checkpoint (beyond `parse_inputs`): no meta-token strings in texts, no images
        for a text-only backbone. Raises ValueError naming the first offending item."""
        forbidden = self.config.query_meta_tokens + self.config.candidate_meta_tokens
        for item in items:
            if item.text is not None and any(token in item.text for token in forbidden):
                raise ValueError(f"item {item.index}: text contains a MetaEmbed meta token string")
            if item.image is not None and not self.has_vision:
                raise ValueError(
                    f"item {item.index}: has an image but this MetaEmbed backbone ({self.family}) is text-only"
                )

    # -------------------------------------------------------------------------------------------------- batching
    def __call__(self, inputs, role: str = "candidate", instruction=None, return_tensors: str = "pt"):
        """Model inputs for a batch of raw inputs (see `parse_inputs`) or already parsed `EncodeItem`s."""
        check_role(role)
        items = inputs if inputs and all(isinstance(i, EncodeItem) for i in inputs) else parse_inputs(inputs)
        if not items:
            raise ValueError("inputs are empty: nothing to process")
        self.check_items(items)
        instructions = per_item_instructions(instruction, len(items))
        images, prompts = [], []
        for item, item_instruction in zip(items, instructions):
            image = None if item.image is None else load_image(item.image, item.index, self.max_image_pixels)
            images.append(image)
            prompts.append(self.build_prompt(item, role, item_instruction))
        meta_suffix = "".join(self.config.meta_tokens(role))  # appended after the whole prompt

        kwargs = {"padding": True, "return_tensors": return_tensors}
        if self.uses_chat_template:
            kwargs["add_special_tokens"] = False  # the chat template already wrote them
        if self.family == "paligemma":
            batch = self._paligemma_batch(prompts, images, meta_suffix, kwargs)
        elif not self.has_vision:
            batch = self.processor([prompt + meta_suffix for prompt in prompts], **kwargs)
        else:
            texts = [prompt + meta_suffix for prompt in prompts]
            present = [image for image in images if image is not None]
            if self.family == "mllama" and 0 < len(present) < len(images):
                batch = self._mllama_mixed_batch(texts, images, kwargs)
            elif self.family == "mllama":
                batch = self.processor(text=texts, images=[[image] for image in present] or None, **kwargs)
            else:
                batch = self.processor(text=texts, images=present or None, **kwargs)
        self._check_meta_tokens(batch["input_ids"], items, role)
        return batch

    def condition_on_traces(self, items: list, traces: list) -> list:
        """Think-Then-Embed: the items with each one's reasoning trace joined to its text by
        `config.reasoning_template` (after the content, before the meta tokens). A trace over
        `config.max_trace_tokens` tokens is cut to that length with a warning; a None trace leaves its item alone."""
        if len(traces) != len(items):
            raise ValueError(f"got {len(traces)} traces for {len(items)} inputs: give one per input (None for none)")
        limit = self.config.max_trace_tokens
        conditioned = []
        for item, trace in zip(items, traces):
            if trace is None:
                conditioned.append(item)
                continue
            if not isinstance(trace, str) or not trace.strip():
                raise ValueError(
                    f"item {item.index}: its trace is {'empty' if isinstance(trace, str) else type(trace).__name__}"
                )
            ids = self.tokenizer(trace, add_special_tokens=False)["input_ids"]
            if len(ids) > limit:
                warnings.warn(
                    f"item {item.index}: its trace has {len(ids)} tokens; cut to {limit} (config.max_trace_tokens)",
                    stacklevel=3,
                )
                trace = self.tokenizer.decode(ids[:limit], skip_special_tokens=True)
            text = self.config.reasoning_template.format(text=item.text or "", trace=trace.strip()).strip()
            conditioned.append(type(item)(item.index, text, item.image))
        return conditioned

    def _paligemma_batch(self, prompts: list, images: list, meta_suffix: str, kwargs: dict):
        """PaliGemma's processor requires an image in every row; MetaEmbed mixes text-only rows in. Rows are
        laid out as that processor lays them out ([image tokens] <bos> prompt \\n), the meta tokens after the whole
        prompt, and every token in the bidirectional prefix (token_type_ids 0)."""
        processor = self.processor
        image_tokens = processor.image_token * processor.image_seq_length
        texts = [
            (image_tokens if image is not None else "") + self.tokenizer.bos_token + prompt + "\n" + meta_suffix
            for prompt, image in zip(prompts, images)
        ]
        batch = self.tokenizer(texts, add_special_tokens=False, **kwargs)
        batch["token_type_ids"] = batch["input_ids"].new_zeros(batch["input_ids"].shape)
        present = [image for image in images if image is not None]
        if present:
            batch["pixel_values"] = processor.image_processor(present, return_tensors=kwargs["return_tensors"])[
                "pixel_values"
            ]
        return batch

    def _mllama_mixed_batch(self, texts: list, images: list, kwargs: dict):
        """Mllama's image processor refuses a batch where some rows have no image: process the image rows and
        the text rows apart, then merge them into one padded batch. Text rows get a zero cross-attention mask
        and blank image tensors (the model runs those rows without the vision path)."""
        image_rows = [i for i, image in enumerate(images) if image is not None]
        text_rows = [i for i, image in enumerate(images) if image is None]
        with_images = self.processor(
            text=[texts[i] for i in image_rows], images=[[images[i]] for i in image_rows], **kwargs
        )
        text_only = self.processor(text=[texts[i] for i in text_rows], **kwargs)
        length = max(with_images["input_ids"].shape[1], text_only["input_ids"].shape[1])
        left = self.tokenizer.padding_side == "left"

        def place(target, rows, source):  # copy source rows into target, aligned on the padding side
            width = source.shape[1]
            columns = slice(length - width, length) if left else slice(0, width)
            target[rows, columns] = source

        batch = {}
        for key, fill in (("input_ids", self.tokenizer.pad_token_id), ("attention_mask", 0)):
            merged = with_images[key].new_full((len(texts), length), fill)
            place(merged, image_rows, with_images[key])
            place(merged, text_rows, text_only[key])
            batch[key] = merged
        cross = with_images["cross_attention_mask"]
        batch["cross_attention_mask"] = cross.new_zeros((len(texts), length) + tuple(cross.shape[2:]))
        place(batch["cross_attention_mask"], image_rows, cross)
        for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
            value = with_images[key]
            merged = value.new_zeros((len(texts),) + tuple(value.shape[1:]))
            merged[image_rows] = value
            batch[key] = merged
        batch["aspect_ratio_ids"][text_rows] = 1  # a valid one-tile layout for the blank rows
        batch["aspect_ratio_mask"][text_rows, :, 0] = 1
        return transformers.BatchFeature(batch, tensor_type=kwargs["return_tensors"])

    def _check_meta_tokens(self, input_ids, items, role: str) -> None:
        """Every row must hold each meta token exactly once (a tokenizer that split one would corrupt the
        embedding silently)."""
        ids = torch.as_tensor(self._meta_ids[role], device=input_ids.device)
        counts = (input_ids.unsqueeze(-1) == ids).sum(dim=1)  # [B, num meta tokens]
        bad = (counts != 1).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"item {items[bad[0]].index}: the meta tokens did not survive tokenisation as single ids; "
                "the tokenizer does not match this checkpoint"
            )

    def process_queries(self, inputs, instruction=None):
        return self(inputs, role="query", instruction=instruction)

    def process_candidates(self, inputs, instruction=None):
        return self(inputs, role="candidate", instruction=instruction)

    # -------------------------------------------------------------------------------------------- saving/loading
    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Save the backbone processor, then mark its processor config as ours so that
        `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` returns a MetaEmbedProcessor."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        backbone_limit = getattr(self, "_backbone_longest_edge", None)
        capped = self._longest_edge() if self.has_vision else None
        if backbone_limit is not None:  # write the backbone's own limit; the cap lives in config.max_image_tokens
            self._set_longest_edge(backbone_limit)
        try:
            self.processor.save_pretrained(save_directory, **kwargs)
        finally:
            if backbone_limit is not None:
                self._set_longest_edge(capped)
        path = save_directory / PROCESSOR_CONFIG_NAME
        data = json.loads(path.read_text()) if path.exists() else {}
        data["backbone_processor_class"] = type(self.processor).__name__ if self.has_vision else "AutoTokenizer"
        data["processor_class"] = "MetaEmbedProcessor"
        data["auto_map"] = {"AutoProcessor": "processing_metaembed.MetaEmbedProcessor"}
        write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, config: MetaEmbedConfig | None = None, **kwargs):
        """Load from a MetaEmbed checkpoint folder or Hub id (config.json plus the backbone processor files)."""
        kwargs.pop("trust_remote_code", None)
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        if config is None:
            config = MetaEmbedConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        config_file = transformers.utils.cached_file(pretrained_model_name_or_path, PROCESSOR_CONFIG_NAME, **hub_kwargs)
        with open(config_file, encoding="utf-8") as handle:
            class_name = json.load(handle).get("backbone_processor_class")
        backbone_class = getattr(transformers, class_name, None) if class_name else None
        if class_name == "LiteVLProcessor":  # the one backbone processor that ships with MetaEmbed itself
            from .processing_litevl import LiteVLProcessor as backbone_class
        if backbone_class is None:
            raise ValueError(
                f"{pretrained_model_name_or_path}: {PROCESSOR_CONFIG_NAME} names backbone processor class "
                f"{class_name!r}, which this transformers version does not provide"
            )
        # Passing the backbone config stops AutoTokenizer from reading config.json, which is ours (remote code).
        processor = backbone_class.from_pretrained(
            pretrained_model_name_or_path, config=config.vlm_config, **hub_kwargs
        )
        return cls(processor, config)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """Called by AutoProcessor after loading remote code; the auto_map is written by `save_pretrained`."""


__all__ = ["MetaEmbedProcessor", "EncodeItem", "parse_inputs", "load_image", "per_item_instructions"]
