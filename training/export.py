"""The final export of a training run, called by every process.

Under FSDP the parameters are shards (DTensors) spread over the processes: no single process can save them or
merge LoRA into them. Every process enters one collective (`accelerator.get_state_dict`, which gives the full
state dict on process 0, on CPU); process 0 then builds a plain, unsharded copy of the trained model's architecture
(its config, plus LoRA when the recipe has it) on the meta device and assigns the gathered tensors to it, so
`save_pretrained` and PEFT's merge run on plain tensors while process 0 holds the weights once: the gathered state
is the copy (nothing is read from disk, nothing is copied). Without FSDP (one process, DDP) process 0 writes the
model it holds, as before.

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


def _unsharded_copy(trained, recipe: dict, state_dict: dict):
    """A plain copy of `trained` (the sharded model: its config, its processor, LoRA when the recipe has it) that
    holds the tensors of `state_dict` themselves. Only parameters are built on the meta device; buffers (rotary
    `inv_freq`, position ids: not in the state dict) are computed on CPU as any fresh build computes them, and those
    built from parameters (PEFT's copy of the meta-token rows) are taken from `trained`."""
    import copy

    from accelerate import init_empty_weights

    from modeling_metaembed import MetaEmbedModel

    from .lora import apply_lora

    lora = recipe.get("lora") is not None
    base = trained.get_base_model() if lora else trained
    with init_empty_weights(include_buffers=False):
        model = MetaEmbedModel(copy.deepcopy(base.config))
        if lora:
            model = apply_lora(model, **recipe["lora"])
    assign_weights(model, state_dict, trained)
    plain = model.get_base_model() if lora else model
    plain.processor, plain.model_card = base.processor, base.model_card  # what save_pretrained writes beside
    return model


def assign_weights(model, state_dict: dict, trained=None) -> None:
    """Make `state_dict`'s tensors `model`'s parameters and persistent buffers, without copying them
    (`load_state_dict(assign=True)`): every key, or an error (never a half-loaded export). Tied parameters stay
    tied as they are in `trained` (else in `model`). A buffer left on the meta device (one a build computes from
    parameters, such as PEFT's `trainable_tokens_original`) is copied from the same name in `trained`; nothing may
    stay on the meta device."""
    from itertools import chain

    # Parameters several modules hold (tied weights), read from the trained model: assign gives each name its own
    # tensor, and a build under init_empty_weights has already untied them (it re-registers every parameter).
    shared = {}
    for name, parameter in (model if trained is None else trained).named_parameters(remove_duplicate=False):
        shared.setdefault(id(parameter), []).append(name)
    model.load_state_dict(state_dict, strict=True, assign=True)
    for names in shared.values():
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, first)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and trained is not None:  # small (a few rows); under FSDP buffers are not sharded
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, trained.get_buffer(name).detach().to("cpu", copy=True))
    left = [name for name, tensor in chain(model.named_parameters(), model.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"the export left {len(left)} tensor(s) on the meta device, first {left[:3]}")


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
            trained = accelerator.unwrap_model(trainer.model)
            model = _unsharded_copy(trained, recipe, state_dict) if sharded else trained
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
