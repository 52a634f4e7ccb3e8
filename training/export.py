"""The final export of a training run, called by every process.

Under FSDP the parameters are shards (DTensors) spread over the processes: no single process can save them or
merge LoRA into them. Every process enters one collective (`accelerator.get_state_dict`, which gives the full
state dict on process 0, on CPU); process 0 then loads it into a plain copy of the model (built from the recipe,
unsharded) and writes from that copy, so `save_pretrained` and PEFT's merge run on plain tensors. Without FSDP
(one process, DDP) process 0 writes the model it holds, as before.

What is written to `directory`:
- full fine-tuning: a MetaEmbed checkpoint (code, config, weights, processor);
- LoRA with `export.merged` true (the default): LoRA and the meta-token rows merged into a plain checkpoint;
- LoRA with `export.merged` false: the adapter alone.
All three load with `from_pretrained`; the folder appears complete or not at all (`save_folder_atomically`).
"""

from pathlib import Path


def _write(model, recipe: dict, directory: Path) -> Path:
    from modeling_metaembed.folders import save_folder_atomically

    from .lora import save_adapter, save_merged

    if recipe.get("lora") is None:
        return save_folder_atomically(model.save_pretrained, directory)
    if (recipe.get("export") or {}).get("merged", True):
        return save_merged(model, directory)
    return save_adapter(model, directory)


def _unsharded_copy(recipe: dict, state_dict: dict):
    """The recipe's model (with LoRA when the recipe has it), unsharded, holding `state_dict`."""
    from .lora import apply_lora
    from .train import build_model

    model = build_model(recipe.get("model") or {})
    if recipe.get("lora") is not None:
        model = apply_lora(model, **recipe["lora"])
    model.load_state_dict(state_dict, strict=True)  # every key, or an error: never a half-loaded export
    return model


def export_final(trainer, recipe: dict, directory) -> Path | None:
    """Write the trained model of `trainer` to `directory` (see the module docstring). Every process must call it.

    Returns the folder on process 0 once it is written, None on the others. If writing fails on process 0, every
    process raises (none is left waiting at the closing barrier)."""
    from accelerate.utils import broadcast_object_list

    accelerator = trainer.accelerator
    directory = Path(directory)
    sharded = trainer.is_fsdp_enabled
    # The collective every process enters: the full state dict on process 0 (CPU), nothing on the others.
    state_dict = accelerator.get_state_dict(trainer.model) if sharded else None
    written, error = None, None
    if trainer.is_world_process_zero():
        try:
            model = _unsharded_copy(recipe, state_dict) if sharded else accelerator.unwrap_model(trainer.model)
            written = _write(model, recipe, directory)
        except Exception as caught:  # noqa: BLE001 - reported to every process below, then raised here
            error = caught
    del state_dict
    status = broadcast_object_list([None if error is None else f"{type(error).__name__}: {error}"])
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"the final export to {directory} failed on process 0: {status[0]}")
    accelerator.wait_for_everyone()
    return written


__all__ = ["export_final"]
