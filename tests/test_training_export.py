"""The final export (training/export.py) holds the weights once: under FSDP, process 0 builds the model to export on
the meta device and assigns the gathered state dict to it, instead of building a second full model from disk.

- Memory: a pair of FSDP2 CPU processes (tests/fsdp_cpu.py) trains a checkpoint whose weights (~190 MB) dwarf the
  process's own noise, and rank 0 measures its peak resident memory around the export alone.
- Same files: the meta-built copy writes byte for byte what a full build loaded with the same state dict writes
  (same arithmetic on both sides), for full fine-tuning, merged LoRA and the adapter.
"""

import ctypes
import filecmp
import gc
import re
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import set_seed

from tests.fsdp_cpu import start_worker
from tests.test_training_fsdp import Runs, run_fsdp_pair, write_recipe

# A checkpoint of ~190 MB (float32) in many tensors of similar size, as real models are: 20 decoder layers of 9.4 MB.
# Gathering a parameter briefly holds it twice (all-gather output, then its unpadded copy), so a model made of one
# huge tensor would show that transient as a second copy of the model; in a real model it is one layer's tensor.
BIG_TEXT = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 20,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
# Allowed growth of rank 0's peak resident memory during the export, beyond the gathered state (one copy of the
# weights): the meta-built model, LoRA's merge (one delta per adapted layer), save_pretrained's metadata and the
# allocator's slack. Measured here (docs/training.md): 1.02 x the weights (full) and 1.13 x (LoRA merged) with the
# meta-device copy; 2.03 x and 2.10 x with the copy built from disk before it. 1.25 x sits between, with room.
MARGIN = 0.25


def _status_kb() -> dict:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) for key in ("VmRSS", "VmHWM")}


def _export_worker(rank, environment, runs, results):
    """A rank of the pair: runs `training.train.main` per scenario; around the final export, resets the peak
    resident size (writing 5 to /proc/self/clear_refs sets VmHWM to the current VmRSS) and reports the peak's
    growth and the bytes of the model's weights."""
    start_worker(environment, rank)
    try:
        from metaembed_training import export
        from metaembed_training.train import main

        export_final, seen = export.export_final, {}

        def measured_export(trainer, recipe, directory):
            parameters = list(trainer.model.parameters())  # DTensors: numel() is the global size
            seen["weight_bytes"] = sum(p.numel() * p.element_size() for p in parameters)
            gc.collect()
            # Memory freed by training (activations, gradients) stays in the process's heap and would be reused by
            # the export unseen: return it to the system first, so the baseline is the memory in use.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            before = _status_kb()["VmRSS"]
            Path("/proc/self/clear_refs").write_text("5")
            written = export_final(trainer, recipe, directory)
            seen["export_growth_bytes"] = (_status_kb()["VmHWM"] - before) * 1024
            seen["written"] = None if written is None else str(written)
            return written

        export.export_final = measured_export
        for name, argv in runs:
            seen.clear()
            set_seed(0)
            seen["status"] = main(argv)
            results.put((name, rank, dict(seen)))
    except BaseException:  # noqa: BLE001 - report, then stop: the other rank's next collective times out (ddp_timeout)
        results.put(("error", rank, traceback.format_exc()))


def test_rss_reset_works_here():
    """The measurement's premise: clear_refs 5 lowers VmHWM to the current VmRSS (Linux >= 4.0)."""
    block = bytearray(64 * 1024**2)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    del block
    assert _status_kb()["VmHWM"] > _status_kb()["VmRSS"] + 48 * 1024
    Path("/proc/self/clear_refs").write_text("5")
    status = _status_kb()
    assert status["VmHWM"] < status["VmRSS"] + 8 * 1024, status


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    from modeling_metaembed.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("big-qwen3"), family="qwen3", text_overrides=BIG_TEXT)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_fsdp_export_peak_memory_on_rank_0_is_one_copy_of_the_weights(big_checkpoint, tmp_path, lora):
    """Rank 0's peak resident memory during an FSDP2 export grows by the gathered state (one copy of the weights)
    and at most MARGIN more; building the model from disk as well would add another copy."""
    name = "lora" if lora else "full"
    recipe = write_recipe(tmp_path / f"{name}.yaml", big_checkpoint, tmp_path / name, 2, lora=lora, max_steps=1)
    seen, errors = run_fsdp_pair([(name, ["--config", recipe])], timeout=240, worker=_export_worker)
    seen = Runs(seen, errors)
    record = seen[name, 0]
    assert record["status"] == 0 and record["written"] == str(tmp_path / name / "final")
    weights, growth = record["weight_bytes"], record["export_growth_bytes"]
    print(
        f"rank 0 export: weights {weights / 1e6:.0f} MB, peak growth {growth / 1e6:.0f} MB ({growth / weights:.2f} x)"
    )
    assert weights > 180e6, weights  # the weights dominate the process's noise
    assert growth <= (1 + MARGIN) * weights, (
        f"rank 0's peak grew by {growth / 1e6:.0f} MB during the export, {growth / weights:.2f} x the weights "
        f"({weights / 1e6:.0f} MB); the bound is {1 + MARGIN:.2f} x"
    )
    # The measurement sees the export's memory: the gathered state, less what lands in pages the process already
    # holds (heap malloc_trim cannot return). Measured 0.89 to 1.0 x the weights on this Xeon; without the gather,
    # about 0. A floor at half keeps that distinction without failing on the allocator's reuse.
    assert growth >= 0.5 * weights, growth


# ------------------------------------------------------------------------------------- same files as a full build
def _trained(recipe):
    """The recipe's model with every trainable parameter moved, as training leaves it."""
    from metaembed_training.building import build_model
    from metaembed_training.lora import apply_lora

    set_seed(0)
    model = build_model(recipe["model"])
    if recipe.get("lora") is not None:
        model = apply_lora(model, **recipe["lora"])
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("kind", ["full", "lora-merged", "lora-adapter"])
def test_the_meta_built_copy_writes_what_a_full_build_writes(tiny_checkpoint, tmp_path, kind):
    """`_unsharded_copy` (meta device, assigned tensors, buffers computed or taken from the trained model) against
    the way before it (a full build from disk, then load_state_dict): the same buffers and the same files, byte for
    byte, on a vision backbone (rotary buffers in both towers)."""
    from metaembed_training.building import build_model
    from metaembed_training.export import _unsharded_copy, _write
    from metaembed_training.lora import apply_lora

    recipe = {"model": {"checkpoint": str(tiny_checkpoint("qwen2_5_vl"))}}
    if kind != "full":
        recipe.update(lora={"r": 4, "alpha": 8}, export={"merged": kind == "lora-merged"})
    trained = _trained(recipe)
    state = {key: value.detach().clone() for key, value in trained.state_dict().items()}
    full = build_model(recipe["model"])
    if kind != "full":
        full = apply_lora(full, **recipe["lora"])
    full.load_state_dict(state, strict=True)
    copy = _unsharded_copy(trained, recipe, {key: value.clone() for key, value in state.items()})
    expected, actual = dict(full.named_buffers()), dict(copy.named_buffers())
    assert actual.keys() == expected.keys()
    for key, buffer in expected.items():
        assert actual[key].dtype == buffer.dtype and torch.equal(actual[key], buffer), key
    assert not any(t.is_meta for t in [*copy.parameters(), *copy.buffers()])
    old, new = _write(full, recipe, tmp_path / "full-build"), _write(copy, recipe, tmp_path / "meta-built")
    files = sorted(path.name for path in old.iterdir())
    assert files == sorted(path.name for path in new.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(old, new, files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight
        self.register_buffer("scale", torch.arange(4.0), persistent=False)


def test_assign_weights_keeps_ties_and_leaves_nothing_on_meta():
    from accelerate import init_empty_weights

    from metaembed_training.export import assign_weights

    trained = _Tied()
    state = {key: value.clone() for key, value in trained.state_dict().items()}
    with init_empty_weights(include_buffers=False):  # re-registers every parameter: unties them
        model = _Tied()
    assert model.decoder.weight is not model.encoder.weight
    assign_weights(model, state, trained)
    assert model.decoder.weight is model.encoder.weight  # tied as in the trained model
    assert model.encoder.weight.data_ptr() == state["encoder.weight"].data_ptr()  # the tensor itself, not a copy
    assert torch.equal(model.scale, trained.scale)

    with init_empty_weights(include_buffers=True):  # a buffer no build computes here: taken from the trained model
        model = _Tied()
    assign_weights(model, state, trained)
    assert torch.equal(model.scale, trained.scale) and not model.scale.is_meta
    with torch.device("meta"):  # keeps the tie; the buffer on meta, and no trained model to take it from
        model = _Tied()
    with pytest.raises(RuntimeError, match=r"meta device.*'scale'"):
        assign_weights(model, state)
    assert model.decoder.weight is model.encoder.weight
    with init_empty_weights(include_buffers=False):
        model = _Tied()
    with pytest.raises(RuntimeError, match="decoder.bias"):  # strict: a missing key is an error that names it
        assign_weights(model, {key: value for key, value in state.items() if key != "decoder.bias"})
