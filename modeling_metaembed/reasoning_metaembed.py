"""Think-Then-Embed: a reasoner writes a short trace explaining a query; the query is embedded with its trace.

This file ships inside every checkpoint (remote code): it imports only public torch/transformers APIs, PIL and
its flat siblings.

- A **reasoner** is any callable `(items) -> traces`: `items` a list of {"text": str | None, "image": PIL image |
  path | None}, one trace string per item. `GenerativeReasoner` makes one from any Hugging Face image-text-to-text
  or causal LM (batched, left-padded `generate`), and `MetaEmbedModel.as_reasoner()` from the embedder's own
  backbone, so one set of weights thinks and embeds.
- `TraceCache` keeps traces on disk keyed by the content of each input and the reasoner's identity, so a data set
  is reasoned over once: shards written atomically per batch (an interrupted run resumes), and a folder written
  by another reasoner is refused.
- `generate_traces` runs a reasoner over inputs through a cache, checking what it returns.
- Generators: `load_generative_backbone` (a backbone kept with its language-model head, `from_vlm(keep_lm_head=True)`)
  and `generator_around` (the generation model around an embedder's own backbone, for `as_reasoner`).
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from PIL import Image
from transformers.utils.logging import get_logger, tqdm

from .hub_metaembed import write_atomic

logger = get_logger(__name__)

CACHE_FORMAT = "metaembed-traces/1"
CACHE_MANIFEST = "reasoner.json"


# ---------------------------------------------------------------------------------------------------- content keys
def _image_bytes(image) -> bytes:
    if isinstance(image, Image.Image):
        return f"{image.mode}:{image.size}:".encode() + image.tobytes()
    return Path(image).read_bytes()  # a path: the file's bytes, so a renamed copy hits the same entry


def content_key(item: dict) -> str:
    """SHA-256 of an input's text and image content: the cache key of its trace."""
    digest = hashlib.sha256()
    text = item.get("text")
    digest.update(b"text:" + (text.encode("utf-8") if text is not None else b"\x00none"))
    image = item.get("image")
    digest.update(b"|image:" + (hashlib.sha256(_image_bytes(image)).digest() if image is not None else b"\x00none"))
    return digest.hexdigest()


def reasoner_identity(reasoner) -> str:
    """A stable name for what produces the traces: `reasoner.identity` when it has one, else the callable's
    qualified name (give your callables an `identity` that changes when their behaviour does)."""
    identity = getattr(reasoner, "identity", None)
    if identity is None:
        name = getattr(reasoner, "__qualname__", type(reasoner).__name__)
        identity = f"{getattr(reasoner, '__module__', '?')}.{name}"
    return str(identity)


# ---------------------------------------------------------------------------------------------------------- cache
class TraceCache:
    """Traces of one reasoner in a folder: `reasoner.json` (the identity) and `shard-*.json` files, each written
    atomically. Opening a folder that holds another reasoner's traces raises ValueError."""

    def __init__(self, directory, identity: str):
        self.directory, self.identity = Path(directory), str(identity)
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / CACHE_MANIFEST
        if manifest.exists():
            try:
                stored = json.loads(manifest.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{manifest} is not valid JSON: {error}") from error
            if stored.get("format") != CACHE_FORMAT or stored.get("reasoner") != self.identity:
                raise ValueError(
                    f"{self.directory} holds traces of reasoner {stored.get('reasoner')!r}, not {self.identity!r}: "
                    "use another cache folder for this reasoner"
                )
        else:
            write_atomic(manifest, json.dumps({"format": CACHE_FORMAT, "reasoner": self.identity}) + "\n")
        self._traces = {}
        for shard in sorted(self.directory.glob("shard-*.json")):
            try:
                self._traces.update(json.loads(shard.read_text(encoding="utf-8")))
            except json.JSONDecodeError as error:  # cannot happen with atomic writes, unless edited by hand
                raise ValueError(f"{shard} is not valid JSON: {error}") from error

    def __len__(self) -> int:
        return len(self._traces)

    def get(self, key: str):
        return self._traces.get(key)

    def add(self, traces: dict) -> None:
        """Store {key: trace} as one new shard."""
        if not traces:
            return
        name = hashlib.sha256("".join(sorted(traces)).encode()).hexdigest()[:16]
        write_atomic(self.directory / f"shard-{name}.json", json.dumps(traces, ensure_ascii=False))
        self._traces.update(traces)


# ------------------------------------------------------------------------------------------------------ reasoning
def generate_traces(
    reasoner, items: list, cache=None, batch_size: int = 8, show_progress_bar: bool | None = None
) -> list:
    """One trace per item from `reasoner`, reading and filling `cache` (a `TraceCache`, a folder, or None).

    A reasoner that returns another number of traces than it was given items, a non-string or an empty trace raises
    ValueError naming the item; nothing from that batch is cached."""
    if isinstance(cache, (str, os.PathLike)):
        cache = TraceCache(cache, reasoner_identity(reasoner))
    keys = [content_key(item) for item in items]
    traces = [cache.get(key) if cache is not None else None for key in keys]
    todo = [i for i, trace in enumerate(traces) if trace is None]
    seen = {}
    for i in todo:  # identical inputs are reasoned over once
        seen.setdefault(keys[i], i)
    unique = sorted(seen.values())
    num_batches = (len(unique) + batch_size - 1) // batch_size
    if show_progress_bar is None:
        show_progress_bar = num_batches > 1
    for start in tqdm(
        range(0, len(unique), batch_size), desc="Reasoning", total=num_batches, disable=not show_progress_bar
    ):
        batch = unique[start : start + batch_size]
        produced = reasoner([items[i] for i in batch])
        if not isinstance(produced, (list, tuple)) or len(produced) != len(batch):
            count = len(produced) if isinstance(produced, (list, tuple)) else type(produced).__name__
            raise ValueError(
                f"the reasoner returned {count} traces for {len(batch)} items (items {batch[0]}..{batch[-1]})"
            )
        for i, trace in zip(batch, produced):
            if not isinstance(trace, str):
                raise ValueError(f"the reasoner's trace for item {i} is a {type(trace).__name__}, not a string")
            if not trace.strip():
                raise ValueError(f"the reasoner returned an empty trace for item {i}")
        if cache is not None:
            cache.add({keys[i]: trace.strip() for i, trace in zip(batch, produced)})
        for i, trace in zip(batch, produced):
            seen[keys[i]] = trace.strip()
    return [trace if trace is not None else seen[key] for trace, key in zip(traces, keys)]


class GenerativeReasoner:
    """A reasoner from a generative model: the `prompt` (with `{query}`) around each item's text, the image (if
    any) in a chat message, batched and left-padded `generate`, and the new tokens decoded.

    Args:
        model: an image-text-to-text or causal LM (`generate`-capable).
        processor: its processor (vision models) or tokenizer.
        prompt: the instruction; `{query}` is replaced by the item's text.
        max_new_tokens, min_new_tokens, do_sample, temperature, top_p: generation settings (greedy by default).
        batch_size: items per `generate` call.
        suppress_token_ids: token ids never generated (the embedder's meta tokens in unified mode).
        name: the model's name in `identity` (default: its `name_or_path`).
    """

    def __init__(
        self,
        model,
        processor,
        prompt: str,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        batch_size: int = 8,
        suppress_token_ids=None,
        name: str | None = None,
        min_new_tokens: int | None = None,
    ):
        if "{query}" not in prompt:
            raise ValueError(f"prompt needs a {{query}} placeholder, got {prompt!r}")
        self.model, self.processor = model, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.prompt, self.batch_size = prompt, batch_size
        self.generation = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if min_new_tokens is not None:
            self.generation["min_new_tokens"] = min_new_tokens
        if do_sample:
            self.generation.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None})
        if suppress_token_ids:
            self.generation["suppress_tokens"] = list(suppress_token_ids)
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__

    @classmethod
    def from_pretrained(cls, name_or_path, prompt: str | None = None, dtype=None, device=None, **kwargs):
        """Load a reasoner checkpoint: an image-text-to-text model with its processor, else a causal LM with its
        tokenizer."""
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        try:
            model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype)
            processor = AutoProcessor.from_pretrained(name_or_path)
        except ValueError:  # not an image-text-to-text architecture
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
            processor = AutoTokenizer.from_pretrained(name_or_path)
        if device is not None:
            model.to(device)
        return cls(model.eval(), processor, prompt or _default_prompt(), **kwargs)

    @property
    def identity(self) -> str:
        settings = json.dumps({"prompt": self.prompt, **self.generation}, sort_keys=True)
        return f"{self.name}|{hashlib.sha256(settings.encode()).hexdigest()[:16]}"

    def _prompt(self, item: dict) -> tuple:
        text = self.prompt.format(query=item.get("text") or "")
        image = item.get("image")
        if image is not None and not isinstance(image, Image.Image):
            image = Image.open(image).convert("RGB")
        has_vision = hasattr(self.processor, "image_processor")
        if self.uses_chat_template:
            content = [{"type": "image"}] if image is not None and has_vision else []
            content.append({"type": "text", "text": text})
            messages = [{"role": "user", "content": content if has_vision else text}]
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, image if has_vision else None

    @property
    def uses_chat_template(self) -> bool:
        return bool(getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None))

    @torch.inference_mode()
    def __call__(self, items: list) -> list:
        traces = []
        for start in range(0, len(items), self.batch_size):
            prompts, images = zip(*(self._prompt(item) for item in items[start : start + self.batch_size]))
            present = [image for image in images if image is not None]
            if present and len(present) != len(images):  # one generate call cannot mix rows with and without images
                traces.extend(t for i in range(len(prompts)) for t in self._generate([prompts[i]], [images[i]]))
            else:
                traces.extend(self._generate(list(prompts), present))
        return traces

    def _generate(self, prompts: list, images: list) -> list:
        # Left padding: generation continues every row from its last real token. The tokenizer may be shared with
        # the embedder's processor (unified mode), so its padding side is put back afterwards.
        kwargs = {"padding": True, "return_tensors": "pt", "add_special_tokens": not self.uses_chat_template}
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            if hasattr(self.processor, "image_processor"):
                images = [image for image in images if image is not None]
                inputs = self.processor(text=prompts, images=images or None, **kwargs)
            else:
                inputs = self.tokenizer(prompts, **kwargs)
        finally:
            self.tokenizer.padding_side = side
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        output = self.model.generate(**inputs, pad_token_id=pad, **self.generation)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# ------------------------------------------------------------------------------------------------------ generators
def ties_word_embeddings(config) -> bool:
    """Whether a backbone config ties its language-model head to its input embeddings."""
    text_config = config.get_text_config()
    return bool(getattr(text_config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))


def load_generative_backbone(path, dtype, trust_remote_code: bool, load_kwargs: dict) -> tuple:
    """(base model, language-model head or None when the head is tied to the embeddings) of a generative backbone."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            generator = auto_class.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code, **load_kwargs
            )
        except ValueError:  # not this kind of architecture
            continue
        base = getattr(generator, generator.base_model_prefix)
        return base, None if ties_word_embeddings(generator.config) else generator.get_output_embeddings()
    raise ValueError(f"{path}: keep_lm_head=True needs a generative backbone (image-text-to-text or causal LM)")


def generator_around(backbone, backbone_config, head, device):
    """The generation model (image-text-to-text, else causal LM) of `backbone_config` around `backbone` itself (no
    copy: the same weights) with `head` as its language-model head, or, when `head` is None, a head on `device`
    sharing the backbone's input embeddings (tied)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    generator = None
    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            with torch.device("meta"):
                generator = auto_class.from_config(backbone_config)
            break
        except ValueError:
            continue
    if generator is None:
        family = backbone_config.model_type
        raise ValueError(f"the {family} backbone has no generative model in transformers")
    setattr(generator, generator.base_model_prefix, backbone)
    if head is None:
        embeddings = backbone.get_input_embeddings()
        head = torch.nn.Linear(embeddings.weight.shape[1], embeddings.weight.shape[0], bias=False, device=device)
        head.weight = embeddings.weight  # tied: shares the parameter
    generator.set_output_embeddings(head)
    left = [name for name, p in generator.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"cannot build a generator around this backbone: {left[:3]} have no weights")
    return generator


def _default_prompt() -> str:
    from .configuration_metaembed import DEFAULT_REASONING_PROMPT

    return DEFAULT_REASONING_PROMPT


__all__ = [
    "GenerativeReasoner",
    "TraceCache",
    "generate_traces",
    "content_key",
    "reasoner_identity",
    "load_generative_backbone",
    "generator_around",
    "ties_word_embeddings",
]
