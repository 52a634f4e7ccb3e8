"""`--dry-run`'s memory estimate (training.dry_run.estimate_memory) against memory measured on real training steps
on CPU, per component: parameters, gradients, AdamW state, and the activations' peak with and without gradient
checkpointing and GradCache.

Each mode runs in a fresh process (`_measure`): a real `MetaEmbedTrainer` step on a small Qwen3 backbone, then
- parameters, gradients, optimizer state: the bytes of the tensors the run holds after a step;
- activations: the growth of the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs) over
  a second training step (forward, loss, backward), beyond what it held before. glibc is told to map every block
  above 64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the resident set at once and the peak
  is the peak of live tensors, not of the heap. The estimate compared is activations + embeddings + MaxSim scores
  (what a step adds on top of weights, gradients and optimizer state), at the step's real (padded) token counts.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metaembed_training.dry_run import ESTIMATE_MARGINS

ROOT = Path(__file__).resolve().parents[1]
# Wide enough that tensors, not the Python process, dominate: 4 layers, hidden 256, MLP 1024.
TEXT = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
BATCH = 8  # queries per step; candidates: a positive and one hard negative each
QUERY_CHARS, CANDIDATE_CHARS = 160, 96  # byte-level tokenizer: a token per byte
MODES = {  # mode of estimate_memory -> training arguments
    "plain": {},
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "gradcache": {"gradcache_chunk_size": 4},
    "gradcache_and_gradient_checkpointing": {"gradcache_chunk_size": 4, "gradient_checkpointing": True},
}
# Margins per component: training.dry_run.ESTIMATE_MARGINS, the ones --dry-run prints. Parameters, gradients and
# AdamW state are counted from the meta model, so they agree but for AdamW's step counters (a float32 scalar per
# tensor): 1 %. A step's peak: the estimate counts what the layers keep for the backward; the measured peak also
# holds transients (attention and MLP working tensors, the recomputed layer's gradients, the loss's blocks).
# Measured here: -18 % (gradient checkpointing) to +22 % (GradCache with checkpointing); 30 % keeps room for noise.


def _status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def _records(count: int) -> list:
    import random

    rng = random.Random(0)

    def text(n):
        return "".join(rng.choice("abcdefghij klmnop") for _ in range(n))

    return [
        {
            "id": f"r{i}",
            "source": "s",
            "query": {"text": text(QUERY_CHARS)},
            "positive": {"text": text(CANDIDATE_CHARS)},
            "negatives": [{"text": text(CANDIDATE_CHARS)}],
        }
        for i in range(count)
    ]


def _measure(checkpoint: str, mode: str, output_dir: str) -> dict:
    """One mode's measurement, in this (fresh) process; see the module docstring."""
    import ctypes
    import gc

    import torch

    from metaembed_training.data import ContrastiveDataset
    from metaembed_training.trainer import MetaEmbedTrainer, MetaEmbedTrainingArguments
    from modeling_metaembed import MetaEmbedModel

    torch.manual_seed(0)
    settings = dict(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=BATCH,
        optim="adamw_torch",
        learning_rate=1e-4,
        **MODES[mode],
    )
    args = MetaEmbedTrainingArguments(**settings)
    model = MetaEmbedModel.from_pretrained(checkpoint)
    trainer = MetaEmbedTrainer(model=model, args=args, train_dataset=ContrastiveDataset(_records(BATCH)))
    if args.gradient_checkpointing:  # as Trainer.train does before its loop
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop
    optimizer = trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.training_step(model, batch)
    optimizer.step()
    parameters = list(model.parameters())
    measured = {
        "settings": settings,
        "parameters": sum(p.numel() * p.element_size() for p in parameters),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in parameters if p.grad is not None),
        "optimizer_adamw": sum(
            t.numel() * t.element_size()
            for state in optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        ),
        "tokens": {
            side: max(chunk["inputs"]["input_ids"].shape[1] for chunk in batch[side])
            for side in ("queries", "candidates")
        },
    }
    optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated: the next step adds into them
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    trainer.training_step(model, batch)
    measured["step_peak_growth"] = (_status_kb("VmHWM") - before) * 1024
    return measured


def _estimate(checkpoint: str, measured: dict) -> dict:
    from metaembed_training.dry_run import build_meta_model, estimate_memory, training_arguments

    _, config, info = build_meta_model({"checkpoint": checkpoint}, None)
    args = training_arguments(measured["settings"])  # the recipe's training section a dry run would read
    text = (
        measured["tokens"]["queries"] - config.num_query_vectors,
        measured["tokens"]["candidates"] - config.num_candidate_vectors,
    )
    data = {"images": {"query": False, "positive": False, "negative": False}, "negatives": 1}
    launch = {"num_processes": 1, "strategy": "ddp"}
    return estimate_memory(info, config, args, launch, data, None, text_tokens=text)


@pytest.fixture(scope="module")
def measurements(tmp_path_factory):
    from modeling_metaembed.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("memory-plan")
    checkpoint = str(make_tiny_checkpoint(root / "checkpoint", family="qwen3", text_overrides=TEXT))
    environment = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="65536",
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
    )
    results = {}
    for mode in MODES:
        code = (
            "import json, sys; from tests.test_training_memory_plan import _measure; "
            "print('MEASURED', json.dumps(_measure(*sys.argv[1:])))"
        )
        run = subprocess.run(
            [sys.executable, "-c", code, checkpoint, mode, str(root / mode)],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            check=False,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        measured = json.loads(run.stdout.split("MEASURED", 1)[1])
        results[mode] = (measured, _estimate(checkpoint, measured))
    return results


@pytest.mark.parametrize("mode", list(MODES))
def test_memory_estimate_matches_measured_per_component(measurements, mode):
    measured, estimate = measurements[mode]
    per_rank = estimate["per_rank_bytes"]
    for component in ("parameters", "gradients", "optimizer_adamw"):
        got, want = measured[component], per_rank[component]
        margin = ESTIMATE_MARGINS[component]
        assert abs(got - want) <= margin * want, f"{mode}: {component} measured {got:,} vs estimated {want:,}"
    step = estimate["activations_bytes"][mode] + per_rank["embeddings"] + per_rank["maxsim_scores"]
    got = measured["step_peak_growth"]
    print(f"{mode}: tokens {measured['tokens']}, step peak {got / 2**20:.1f} MiB, estimated {step / 2**20:.1f} MiB")
    margin = ESTIMATE_MARGINS["step"]
    assert abs(got - step) <= margin * step, (
        f"{mode}: a step's peak grew by {got / 2**20:.1f} MiB, the estimate is {step / 2**20:.1f} MiB "
        f"({got / step - 1:+.0%}, margin ±{margin:.0%})"
    )


def test_dry_run_prints_the_checked_margins(capsys):
    from metaembed_training.dry_run import dry_run
    from metaembed_training.train import load_recipe

    recipe_path = ROOT / "training" / "recipes" / "tiny-synthetic.yaml"
    dry_run(load_recipe(recipe_path), recipe_path)
    out = capsys.readouterr().out
    margins = next(line for line in out.splitlines() if line.startswith("margins:"))
    assert f"±{ESTIMATE_MARGINS['step']:.0%}" in margins and "tests/test_training_memory_plan.py" in margins, margins
