"""Convert a checkpoint of the official MetaEmbed code (facebookresearch/MetaEmbed) into this package's format.

The official model is a `Qwen2_5_VLForConditionalGeneration` subclass saved with the pre-5.0 key layout
(`model.layers...`, `visual.blocks...`) plus:
  - `prompt_embed_tokens.weight` [R_q + R_c, H]: the meta tokens' input embeddings, which replace the last
    R_q + R_c positions of every input (queries and candidates alike), query rows first;
  - `custom_text_proj.{weight,bias}` (optional): a linear projection before L2 normalisation;
  - possibly as a LoRA adapter (adapter_config.json + adapter_model.safetensors) over a ColQwen2.5 base, with
    `prompt_embed_tokens` and `custom_text_proj` as modules_to_save.
Its settings (R_q, R_c) were from_pretrained arguments, not config entries, so they are given here.

Here the meta tokens become R_q + R_c new vocabulary tokens whose embedding rows are `prompt_embed_tokens`,
and `custom_text_proj` becomes `output_projection`: the same network computes the same vectors. `verify`
recomputes the official forward (embedding replacement at the last positions, exactly as the official code
patches it) on probe inputs and compares.
"""

import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from modeling_metaembed import MetaEmbedModel
from modeling_metaembed.folders import save_folder_atomically
from modeling_metaembed.processing_metaembed import load_image, parse_inputs

META_KEYS = ("prompt_embed_tokens.weight", "custom_text_proj.weight", "custom_text_proj.bias")
PROCESSOR_FILES = re.compile(r".*(tokenizer|vocab|merges|processor|preprocessor|chat_template|special_tokens).*")


class ConversionError(ValueError):
    """The source is not an official MetaEmbed checkpoint this converter understands; the message says why."""


def _read_state_dict(folder: Path, stem: str = "model") -> dict:
    index = folder / f"{stem}.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else [f"{stem}.safetensors"]
    )
    state = {}
    for name in files:
        if not (folder / name).is_file():
            raise ConversionError(f"{folder}: weight file {name} is missing")
        with safe_open(folder / name, framework="pt") as weights:
            for key in weights.keys():
                state[key] = weights.get_tensor(key)
    return state


def _resolve(source: str) -> Path:
    """A local folder, or a Hub repo id resolved through the local cache (offline) or a download."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source))
    except Exception as error:
        raise ConversionError(f"{source}: not a local folder and not available from the Hub cache: {error}") from error


def merge_lora_adapter(base_state: dict, adapter_folder: Path) -> dict:
    """Fold a PEFT LoRA adapter (and its modules_to_save) into a state dict with the base's key names."""
    config = json.loads((adapter_folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"adapter type {config.get('peft_type')!r} is not supported (LoRA only)")
    for unsupported in ("use_dora", "fan_in_fan_out"):
        if config.get(unsupported):
            raise ConversionError(f"LoRA adapters with {unsupported}=true are not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ConversionError("LoRA adapters with per-module rank_pattern/alpha_pattern are not supported")
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    adapter = _read_state_dict(adapter_folder, stem="adapter_model")
    merged = dict(base_state)
    pairs = {}
    for key, value in adapter.items():
        name = key.removeprefix("base_model.model.")
        match = re.fullmatch(r"(.*)\.lora_([AB])(?:\.default)?\.weight", name)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = value
            continue
        name = re.sub(r"\.modules_to_save(?:\.default)?", "", name)  # a fully trained module: replace it
        merged[name] = value
    for module, weights in pairs.items():
        target = f"{module}.weight"
        if target not in merged or set(weights) != {"A", "B"}:
            raise ConversionError(f"LoRA weights for {module} do not match a base weight")
        delta = (weights["B"].float() @ weights["A"].float()) * scale
        merged[target] = (merged[target].float() + delta).to(merged[target].dtype)
    return merged


def read_official(source, base=None) -> tuple:
    """(folder with config.json, folder with the processor files, full state dict) of an official checkpoint
    or of a LoRA adapter merged into its base."""
    folder = _resolve(source)
    if (folder / "adapter_config.json").is_file():
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        base = base or adapter_config.get("base_model_name_or_path")
        if not base:
            raise ConversionError(f"{folder}: a LoRA adapter without base_model_name_or_path: pass the base")
        base_folder = _resolve(base)
        return base_folder, folder, merge_lora_adapter(_read_state_dict(base_folder), folder)
    return folder, folder, _read_state_dict(folder)


def _write_backbone(config_folder: Path, processor_folder: Path, state: dict, target: Path) -> None:
    config = json.loads((config_folder / "config.json").read_text())
    if config.get("model_type") != "qwen2_5_vl":
        raise ConversionError(
            f"{config_folder}: model_type {config.get('model_type')!r}; the official MetaEmbed checkpoints this "
            "converter reads are Qwen2.5-VL ('qwen2_5_vl')"
        )
    config["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    # Keys stay as written: transformers reads both the pre-4.52 layout (`model.layers`, `visual.*`, which it
    # also writes for this family) and the newer one (`model.language_model.*`, `model.visual.*`).
    backbone = {k: v.contiguous() for k, v in state.items() if k not in META_KEYS and k != "learnable_temp"}
    save_file(backbone, target / "model.safetensors", metadata={"format": "pt"})
    for folder in dict.fromkeys([processor_folder, config_folder]):
        for path in folder.iterdir():
            if path.is_file() and PROCESSOR_FILES.match(path.name) and not (target / path.name).exists():
                shutil.copy2(path, target / path.name)


def convert(
    source,
    output,
    *,
    num_query_vectors: int = 16,
    num_candidate_vectors: int = 64,
    base=None,
    verify: bool = True,
    tolerance: float = 1e-4,
    **config_kwargs,
) -> float | None:
    """Write the converted checkpoint to `output` (atomically: a complete folder or none). Returns the largest
    difference between official and converted embeddings on the probe inputs when `verify` (else None)."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ConversionError(f"output folder {output} is not empty")
    config_folder, processor_folder, state = read_official(source, base)
    if "prompt_embed_tokens.weight" not in state:
        raise ConversionError(f"{source}: no prompt_embed_tokens.weight: not an official MetaEmbed checkpoint")
    meta_rows = state["prompt_embed_tokens.weight"]
    if meta_rows.shape[0] != num_query_vectors + num_candidate_vectors:
        raise ConversionError(
            f"prompt_embed_tokens has {meta_rows.shape[0]} rows but R_q + R_c = {num_query_vectors} + "
            f"{num_candidate_vectors}: give the numbers the checkpoint was trained with (shared query/candidate "
            "prompts are not supported)"
        )
    projection = {
        k.split(".")[-1]: state[k] for k in ("custom_text_proj.weight", "custom_text_proj.bias") if k in state
    }

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="metaembed-convert-", dir=output.parent) as work:
        work = Path(work)
        _write_backbone(config_folder, processor_folder, state, work / "backbone")
        model = MetaEmbedModel.from_vlm(
            work / "backbone",
            num_query_vectors=num_query_vectors,
            num_candidate_vectors=num_candidate_vectors,
            embedding_dim=projection["weight"].shape[0] if projection else None,
            padding_side="left",
            **config_kwargs,
        )
        with torch.no_grad():
            embedding = model.vlm.get_input_embeddings().weight
            ids = model.config.query_meta_token_ids + model.config.candidate_meta_token_ids
            embedding[ids] = meta_rows.to(embedding.dtype)
            if projection:
                model.output_projection.weight.copy_(projection["weight"])
                if "bias" in projection:
                    model.output_projection.bias.copy_(projection["bias"])
                else:
                    model.output_projection.bias.zero_()
        difference = None
        if verify:
            difference = verify_against_official(model, meta_rows, projection)
            if difference > tolerance:
                raise ConversionError(
                    f"converted embeddings differ from the official forward by {difference:.2e} (> {tolerance:.0e})"
                )
        save_folder_atomically(model.save_pretrained, output)
    return difference


def _probe_inputs(model: MetaEmbedModel) -> list:
    inputs = ["what is in this picture", "A long caption: " + "words " * 20]
    if model.processor.has_vision:
        gradient = torch.linspace(0, 255, 56 * 84).reshape(56, 84).to(torch.uint8)
        image = Image.fromarray(torch.stack([gradient, gradient.flip(0), gradient.flip(1)], -1).numpy())
        inputs += [image, {"text": "a caption", "image": image}]
    return inputs


@torch.no_grad()
def official_embeddings(
    vlm,
    backbone_processor,
    prompts: list,
    images: list,
    meta_rows,
    projection: dict,
    r_q: int,
    r_c: int,
    role: str,
) -> torch.Tensor:
    """The official forward: the prompts' tokens (left padded), then R_q + R_c placeholder ids whose input
    embeddings are replaced by `prompt_embed_tokens`, last-layer states at the role's positions, projection,
    L2 normalisation. `vlm` is the backbone's base model, `backbone_processor` its processor."""
    added = r_q + r_c
    tokenizer = getattr(backbone_processor, "tokenizer", backbone_processor)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = backbone_processor(
            text=prompts, images=images or None, padding=True, return_tensors="pt", add_special_tokens=False
        )
    finally:
        tokenizer.padding_side = side
    rows = batch["input_ids"].shape[0]
    ones = torch.ones(rows, added, dtype=torch.long)
    batch["input_ids"] = torch.cat([batch["input_ids"], ones], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], ones], dim=1)
    if "mm_token_type_ids" in batch:
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ones)], dim=1)

    def replace_last_positions(module, args, output):
        output = output.clone()
        output[:, -added:] = meta_rows.to(output.dtype)
        return output

    hook = vlm.get_input_embeddings().register_forward_hook(replace_last_positions)
    try:
        hidden = vlm(**batch, use_cache=False).last_hidden_state
    finally:
        hook.remove()
    states = hidden[:, -added:-r_c] if role == "query" else hidden[:, -r_c:]
    if projection:
        states = torch.nn.functional.linear(states, projection["weight"], projection.get("bias"))
    return torch.nn.functional.normalize(states.float(), p=2, dim=-1)


def probe_prompts(model: MetaEmbedModel, inputs: list, role: str) -> tuple:
    """The prompts (without meta tokens) and decoded images that `model.encode(inputs, role)` would use."""
    items = parse_inputs(inputs)
    processor = model._require_processor()
    prompts = [processor.build_prompt(item, role) for item in items]
    images = [
        load_image(item.image, item.index, processor.max_image_pixels) for item in items if item.image is not None
    ]
    return prompts, images


def verify_against_official(model: MetaEmbedModel, meta_rows, projection: dict) -> float:
    model.eval()
    inputs = _probe_inputs(model)
    r_q, r_c = model.config.num_query_vectors, model.config.num_candidate_vectors
    worst = 0.0
    for role in ("query", "candidate"):
        prompts, images = probe_prompts(model, inputs, role)
        expected = official_embeddings(
            model.vlm, model.processor.processor, prompts, images, meta_rows, projection, r_q, r_c, role
        )
        actual = model.encode(inputs, role=role)
        worst = max(worst, float((expected - actual).abs().max()))
    return worst


__all__ = ["convert", "ConversionError", "official_embeddings", "probe_prompts", "merge_lora_adapter"]
