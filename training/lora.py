"""LoRA through PEFT for MetaEmbed, with the meta-token embedding rows trainable, and the two ways out of it:
the adapter alone, or a merged checkpoint that loads with `AutoModel.from_pretrained(..., trust_remote_code=True)`
and needs no PEFT.

The meta tokens are rows of the backbone's input embedding; PEFT trains exactly those rows through
`trainable_token_indices` (a raw `nn.Parameter` in `modules_to_save` would silently stay frozen).
"""

from pathlib import Path

from torch import nn

from modeling_metaembed.folders import save_folder_atomically

# Linear layers of the language model that LoRA adapts (Llama/Qwen/Gemma names; BERT names).
LANGUAGE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_PROJECTIONS = ("query", "key", "value", "dense")
# Module-name components that mark the vision side of each supported backbone.
VISION_PARTS = ("visual", "vision_tower", "vision_model", "multi_modal_projector")


def lora_target_modules(model, include_vision: bool = False) -> list:
    """Full names of the Linear layers LoRA should adapt: the language model's attention and MLP projections, and
    with `include_vision` every Linear layer of the vision tower (and its projector)."""
    family = model.config.vlm_config.model_type
    language_names = BERT_PROJECTIONS if family == "bert" else LANGUAGE_PROJECTIONS
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.startswith("output_projection") or "pooler" in name:
            continue
        parts = name.split(".")
        is_vision = any(part in VISION_PARTS for part in parts)
        if is_vision:
            if include_vision:
                targets.append(name)
        elif parts[-1] in language_names:
            targets.append(name)
    if not targets:
        raise ValueError(f"found no Linear layer to adapt in this {family} backbone")
    return targets


def apply_lora(
    model,
    r: int = 32,
    alpha: int = 32,
    dropout: float = 0.0,
    include_vision: bool = False,
    train_meta_tokens: bool = True,
    target_modules: list | None = None,
):
    """Wrap a MetaEmbedModel in a PEFT LoRA model (paper: r = alpha = 32 on every size).

    Args:
        model: a `MetaEmbedModel`.
        r / alpha / dropout: LoRA rank, scaling numerator and dropout.
        include_vision: adapt the vision tower too (default: only the language model).
        train_meta_tokens: train the meta tokens' embedding rows (and nothing else of the embedding).
        target_modules: explicit module names, replacing `lora_target_modules(model, include_vision)`.

    Returns:
        the `PeftModel`; `model.processor` stays reachable as `peft_model.get_base_model().processor`.
    """
    from peft import LoraConfig, get_peft_model

    config = model.config
    meta_ids = list(config.query_meta_token_ids or []) + list(config.candidate_meta_token_ids or [])
    if train_meta_tokens and not meta_ids:
        raise ValueError("the model config has no meta-token ids: build the model with MetaEmbedModel.from_vlm")
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or lora_target_modules(model, include_vision),
        trainable_token_indices=sorted(meta_ids) if train_meta_tokens else None,
        modules_to_save=["output_projection"] if model.output_projection is not None else None,
        bias="none",
    )
    return get_peft_model(model, lora_config)


def save_adapter(peft_model, directory) -> Path:
    """The LoRA adapter (and trained meta-token rows) alone; load it over the base checkpoint with PEFT."""
    return save_folder_atomically(peft_model.save_pretrained, directory)


def save_merged(peft_model, directory) -> Path:
    """Merge LoRA and the trained meta-token rows into the weights and save a plain MetaEmbed checkpoint (remote
    code, processor and all) that loads with `AutoModel.from_pretrained(directory, trust_remote_code=True)`.
    The merge happens in place (no second copy of a large model in memory): the PEFT wrapper is used up, and the
    returned folder is the way to go on."""
    merged = peft_model.merge_and_unload()
    return save_folder_atomically(merged.save_pretrained, directory)


__all__ = ["apply_lora", "lora_target_modules", "save_adapter", "save_merged", "LANGUAGE_PROJECTIONS"]
