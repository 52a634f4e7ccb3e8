"""`training.train` under FSDP2 on two CPU processes (gloo), against one process on the same global batch.

FSDP2 is driven the way `accelerate launch --config_file training/accelerate/fsdp2.yaml` drives it on GPUs, through
the test-side shim in `tests/fsdp_cpu.py` (accelerate itself does not run FSDP on CPU; see there and
docs/training-fsdp2.md). One spawned pair runs every scenario in turn — full fine-tuning, LoRA, checkpoints,
resume, GradCache, the final export (full, merged and adapter) — and reports what each rank saw; the test then loads
the exports in this process and compares them with one-process runs of the same recipes. A second pair trains a tiny
Qwen2.5-VL with the shipped config's layer classes on data where one rank's half of the batch holds an image and
the other's is text only (placeholder images keep the vision tower's collectives in step).
"""

import os
import queue as queue_module
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file
from transformers import AutoModel, set_seed

from tests.fsdp_cpu import launch_environment, start_worker

PER_DEVICE_BATCH = 4
STEPS = 2
QUERIES = ["what is a red square", "the ocean in winter", "how to cook rice"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recipe(path, checkpoint, output_dir, per_device_batch, lora=False, merged=True, data=None, **training) -> str:
    """A recipe two runs can be compared on: plain SGD at a constant rate, no clipping, one seed (the synthetic task
    unless `data` names other data)."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device_batch,
        max_steps=STEPS,
        optim="sgd",
        learning_rate=0.02,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        ddp_timeout=90,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    settings.update(training)
    recipe = {
        "model": {"checkpoint": str(checkpoint)},
        "data": data or {"synthetic": {"count": 16, "seed": 12}},
        "training": settings,
    }
    if lora:
        recipe["lora"] = {"r": 4, "alpha": 8}
        recipe["export"] = {"merged": merged}
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


SCENARIO_NAMES = (
    "full",
    "full-resumed",
    "gradcache",
    "lora",
    "lora-adapter-resumed",
    "ddp-lora-adapter",
    "export-refused",
)
FSDP_SCENARIOS = ("full", "full-resumed", "gradcache", "lora", "lora-adapter-resumed")
EXPECTED_TO_RAISE = ("export-refused",)


def scenarios(checkpoint, root):
    """(name, argv of training.train) in the order the pair runs them; resumes read an earlier run's checkpoint."""

    def recipe(name, **kwargs):
        return ["--config", write_recipe(root / f"{name}.yaml", checkpoint, root / name, PER_DEVICE_BATCH, **kwargs)]

    saving = {"save_strategy": "steps", "save_steps": 1}
    runs = [
        ("full", recipe("full", **saving)),
        ("full-resumed", recipe("full-resumed") + ["--resume", str(root / "full" / "checkpoint-1")]),
        ("gradcache", recipe("gradcache", gradcache_chunk_size=2)),
        ("lora", recipe("lora", lora=True, **saving)),
        (
            "lora-adapter-resumed",
            recipe("lora-adapter-resumed", lora=True, merged=False) + ["--resume", str(root / "lora" / "checkpoint-1")],
        ),
        ("ddp-lora-adapter", recipe("ddp-lora-adapter", lora=True, merged=False)),  # FSDP off: plain DDP
        ("export-refused", recipe("export-refused", max_steps=1)),  # its final folder appears: rank 0 refuses
    ]
    assert [name for name, _ in runs] == list(SCENARIO_NAMES)
    return runs


# Launch variables a scenario changes for its own run (restored after it): the DDP one runs without FSDP.
SCENARIO_ENVIRONMENT = {"ddp-lora-adapter": {"ACCELERATE_USE_FSDP": "false"}}


def _observe():
    """Spy on the trainer from inside `training.train.main`: what the model is after training (DTensor shards or not,
    DDP or not), how many gradient reduce-scatters each training step issued, and what the export wrote."""
    import torch.distributed as dist

    from metaembed_training import export
    from metaembed_training.trainer import MetaEmbedTrainer

    seen = {}
    counter = {"calls": 0, "forwards": 0}
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        original = getattr(dist, name, None)
        if original is not None:

            def counted(*args, _original=original, **kwargs):
                counter["calls"] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    training_step = MetaEmbedTrainer.training_step

    def counting_step(self, *args, **kwargs):
        before = dict(counter)
        loss = training_step(self, *args, **kwargs)
        seen["reduce_scatters"].append(counter["calls"] - before["calls"])
        seen["forwards"].append(counter["forwards"] - before["forwards"])
        return loss

    MetaEmbedTrainer.training_step = counting_step
    embed_chunk = MetaEmbedTrainer._embed_chunk

    def counting_embed(self, model, chunk, role, *args, **kwargs):
        counter["forwards"] += 1
        inputs = chunk["inputs"]  # what ran: the role, placeholder rows, images (real or placeholder) in the chunk
        images = 0 if inputs.get("image_grid_thw") is None else len(inputs["image_grid_thw"])
        seen["chunks"].append((role, int(chunk.get("num_placeholders", 0)), images))
        return embed_chunk(self, model, chunk, role, *args, **kwargs)

    MetaEmbedTrainer._embed_chunk = counting_embed
    train = MetaEmbedTrainer.train

    def observed_train(self, *args, **kwargs):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
        from torch.nn.parallel import DistributedDataParallel

        output = train(self, *args, **kwargs)
        final = Path(self.args.output_dir) / "final"
        if final.parent.name == "export-refused" and self.is_world_process_zero():
            # Another job writes there while this one trains (training.train refuses an existing export only
            # at its start): the export must fail on process 0, and every process must raise with it.
            final.mkdir(parents=True)
            (final / "keep.txt").write_text("an earlier export\n")
        parameters = list(self.model.parameters())
        seen.update(
            distributed_type=self.accelerator.distributed_type.value,
            all_dtensor=all(isinstance(p, DTensor) for p in parameters),
            local_elements=sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in parameters),
            global_elements=sum(p.numel() for p in parameters),
            ddp=isinstance(self.model_wrapped, DistributedDataParallel),
            vision_parameters=sum("visual" in name.split(".") for name, _ in self.model.named_parameters()),
            vision_dtensor=all(
                isinstance(p, DTensor) for name, p in self.model.named_parameters() if "visual" in name.split(".")
            ),
            fsdp_units=sorted(type(m).__name__ for m in self.model.modules() if isinstance(m, FSDPModule)),
        )
        return output

    MetaEmbedTrainer.train = observed_train
    export_final = getattr(export, "export_final", None)

    def spying_export(trainer, recipe, directory):
        written = export_final(trainer, recipe, directory)
        seen["written"] = None if written is None else str(written)
        return written

    if export_final is not None:
        export.export_final = spying_export
        unsharded_copy = export._unsharded_copy

        def counted_copy(*args, **kwargs):
            seen["unsharded_copies"] += 1
            return unsharded_copy(*args, **kwargs)

        export._unsharded_copy = counted_copy
    return seen


def _fsdp_worker(rank, environment, runs, results):
    start_worker(environment, rank)
    try:
        from metaembed_training.train import main

        seen = _observe()
        for name, argv in runs:
            seen.clear()
            seen.update(reduce_scatters=[], forwards=[], unsharded_copies=0, chunks=[])
            saved = dict(os.environ)
            os.environ.update(SCENARIO_ENVIRONMENT.get(name, {}))
            set_seed(0)  # LoRA's initial weights are drawn before the Trainer seeds
            try:
                seen["status"] = main(argv)
            except Exception as error:
                if name not in EXPECTED_TO_RAISE:
                    raise
                seen["raised"] = f"{type(error).__name__}: {error}"
            finally:
                os.environ.clear()
                os.environ.update(saved)
            results.put((name, rank, dict(seen)))
    except BaseException:  # report, then stop: the other rank's next collective times out (ddp_timeout)
        results.put(("error", rank, traceback.format_exc()))


def run_fsdp_pair(runs, timeout=420, layer_classes="Qwen3DecoderLayer", worker=None) -> tuple:
    """Run `runs` in one spawned pair; ({(name, rank): what that rank saw}, [errors]). A rank stops at its first
    error (its partner then fails its next collective after ddp_timeout), so the scenarios before it still count.
    `layer_classes`: the FSDP units (None: the shipped config's). `worker`: a module-level function with
    `_fsdp_worker`'s arguments and reports (default: `_fsdp_worker`)."""
    environment = launch_environment(layer_classes, num_processes=2, port=free_port())
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=worker or _fsdp_worker, args=(r, environment, runs, results)) for r in range(2)]
    for p in processes:
        p.start()
    seen, errors = {}, []
    try:
        while len(seen) + len(errors) < 2 * len(runs) and len(errors) < 2:
            try:
                name, rank, record = results.get(timeout=timeout)
            except queue_module.Empty:
                errors.append("no answer from the FSDP workers (hang?)")
                break
            if name == "error":
                errors.append(f"rank {rank}:\n{record}")
                if len(errors) == 1:  # give the other rank its ddp_timeout to report too
                    timeout = 120
            else:
                seen[name, rank] = record
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if not errors and any(p.exitcode != 0 for p in processes):
        errors.append(f"worker exit codes {[p.exitcode for p in processes]}")
    return seen, errors


def run_one_process(checkpoint, root, name, **kwargs) -> str:
    """The same recipe in this process, no FSDP, on the same global batch (both ranks' rows in one batch)."""
    from metaembed_training.train import main

    output = root / name
    recipe = write_recipe(root / f"{name}.yaml", checkpoint, output, 2 * PER_DEVICE_BATCH, **kwargs)
    set_seed(0)
    assert main(["--config", recipe]) == 0
    return output / "final"


def weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(actual: dict, expected: dict, what: str):
    assert actual.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=0, msg=f"{what}: {key}")


def encodings(model) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_queries(QUERIES, num_vectors=2)


@pytest.fixture(scope="module")
def fsdp_runs(tiny_checkpoint, tmp_path_factory):
    checkpoint = tiny_checkpoint("qwen3")
    root = tmp_path_factory.mktemp("fsdp")
    seen, errors = run_fsdp_pair(scenarios(checkpoint, root))
    return checkpoint, root, Runs(seen, errors)


class Runs:
    """What each rank saw in each scenario; asking for a scenario that did not finish fails with the workers'
    errors."""

    def __init__(self, seen: dict, errors: list):
        self.seen, self.errors = seen, errors

    def __getitem__(self, key) -> dict:
        if key not in self.seen:
            pytest.fail(f"scenario {key[0]!r} did not finish on rank {key[1]}:\n" + "\n".join(self.errors))
        return self.seen[key]


def test_fsdp2_is_really_active_on_cpu(fsdp_runs):
    """The shim makes accelerate take its FSDP path: every parameter is a DTensor shard, no DDP wrapper."""
    _, _, seen = fsdp_runs
    for name, rank in [(name, rank) for name in FSDP_SCENARIOS for rank in range(2)]:
        record = seen[name, rank]
        assert record["status"] == 0
        assert record["distributed_type"] == "FSDP", (name, rank)
        assert record["all_dtensor"] and not record["ddp"], (name, rank)
        assert record["local_elements"] < 0.75 * record["global_elements"], (name, rank)  # sharded, not replicated
        assert record["unsharded_copies"] == (rank == 0), (name, rank)  # the export's plain copy: rank 0 only
    for rank in range(2):  # the control: without the FSDP variables the same pair runs DDP
        record = seen["ddp-lora-adapter", rank]
        assert record["distributed_type"] == "MULTI_CPU" and record["ddp"] and not record["all_dtensor"]
        assert record["unsharded_copies"] == 0  # nothing to gather: rank 0 saves the model it holds


def test_fsdp2_full_fine_tuning_exports_the_one_process_checkpoint(fsdp_runs):
    """Checkpoints, resume and the final export under FSDP2: rank 0 writes a checkpoint that loads through
    AutoModel and equals the one-process run (weights and encodings); the resumed run ends at the same weights."""
    checkpoint, root, seen = fsdp_runs
    assert (root / "full" / "checkpoint-1" / "pytorch_model_fsdp_0").is_dir()  # a sharded FSDP checkpoint
    assert seen["full-resumed", 0]["status"] == 0
    assert (root / "full" / "final" / "model.safetensors").is_file()
    assert seen["full", 0].get("written") == str(root / "full" / "final") and seen["full", 1].get("written") is None
    single = run_one_process(checkpoint, root, "single-full")
    expected = weights(single)
    assert any((expected[k] - v).abs().max() > 1e-3 for k, v in weights(checkpoint).items())  # training moved them
    assert_same_weights(weights(root / "full" / "final"), expected, "FSDP2 full fine-tuning")
    assert_same_weights(weights(root / "full-resumed" / "final"), expected, "FSDP2 resumed from checkpoint-1")
    model = AutoModel.from_pretrained(root / "full" / "final", trust_remote_code=True)
    reference = AutoModel.from_pretrained(single, trust_remote_code=True)
    torch.testing.assert_close(encodings(model), encodings(reference), atol=1e-5, rtol=0)


def test_fsdp2_lora_exports_merged_and_adapter_like_one_process(fsdp_runs):
    """LoRA under FSDP2: the merged export loads through AutoModel without PEFT and equals the one-process merged
    export; the adapter export (from a resumed run) merges over the base checkpoint to the same weights."""
    from peft import PeftModel

    from modeling_metaembed import MetaEmbedModel

    checkpoint, root, seen = fsdp_runs
    merged = root / "lora" / "final"
    assert seen["lora", 0].get("written") == str(merged)
    assert seen["lora-adapter-resumed", 0].get("written") == str(root / "lora-adapter-resumed" / "final")
    single = run_one_process(checkpoint, root, "single-lora", lora=True)
    expected = weights(single)
    assert any((expected[k] - v).abs().max() > 1e-4 for k, v in weights(checkpoint).items())
    assert not (merged / "adapter_config.json").exists()
    assert_same_weights(weights(merged), expected, "FSDP2 LoRA merged")
    model = AutoModel.from_pretrained(merged, trust_remote_code=True)
    reference = AutoModel.from_pretrained(single, trust_remote_code=True)
    torch.testing.assert_close(encodings(model), encodings(reference), atol=1e-5, rtol=0)

    adapter = root / "lora-adapter-resumed" / "final"
    assert (adapter / "adapter_config.json").exists() and not (adapter / "model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(MetaEmbedModel.from_pretrained(checkpoint), adapter)
    from_adapter = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    reference_state = {k: v.detach() for k, v in reference.state_dict().items()}
    assert_same_weights({k: from_adapter[k] for k in reference_state}, reference_state, "FSDP2 LoRA adapter")

    ddp_adapter = root / "ddp-lora-adapter" / "final"
    assert seen["ddp-lora-adapter", 0].get("written") == str(ddp_adapter)
    peft_model = PeftModel.from_pretrained(MetaEmbedModel.from_pretrained(checkpoint), ddp_adapter)
    from_adapter = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    assert_same_weights({k: from_adapter[k] for k in reference_state}, reference_state, "DDP LoRA adapter")


def test_fsdp2_gradcache_reduces_gradients_once_per_step_and_matches_the_plain_step(fsdp_runs):
    """GradCache under FSDP2: one reduce-scatter per FSDP unit per step, as many as a plain step (not one per
    chunk), and the same weights after training."""
    _, root, seen = fsdp_runs
    for rank in range(2):
        # A plain step embeds each side once; GradCache embeds every chunk twice (cache, then replay with gradients).
        assert seen["full", rank]["forwards"] == [2] * STEPS and min(seen["gradcache", rank]["forwards"]) >= 8
        plain, cached = seen["full", rank]["reduce_scatters"], seen["gradcache", rank]["reduce_scatters"]
        assert len(plain) == len(cached) == STEPS and plain[0] > 0
        assert cached == plain, f"rank {rank}: reduce-scatters per step, GradCache {cached} vs plain {plain}"
    assert_same_weights(weights(root / "gradcache" / "final"), weights(root / "full" / "final"), "GradCache")


def test_a_failed_export_on_rank_0_fails_every_rank_at_once(fsdp_runs):
    """Rank 0 refuses to overwrite a non-empty final folder: it raises, the other rank raises too instead of waiting
    in the closing barrier, and the earlier export is untouched."""
    _, root, seen = fsdp_runs
    assert seen["export-refused", 0]["raised"].startswith("FileExistsError")
    assert seen["export-refused", 1]["raised"].startswith("RuntimeError: the final export")
    assert "failed on process 0: FileExistsError" in seen["export-refused", 1]["raised"]
    assert sorted(p.name for p in (root / "export-refused" / "final").iterdir()) == ["keep.txt"]


# ---------------------------------------------------------------------- GradCache with unequal chunk counts per rank
CHUNK_SIZE = 3


def write_records(path, records) -> dict:
    import json

    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return {"jsonl": [str(path)]}


def short_last_batch_data(root) -> dict:
    """15 records: a full global batch of 8 (4 + 4) and a short one of 7, split 4 + 3. At chunks of 3, one rank
    embeds 2 query and 3 candidate chunks (4 queries, their 4 positives and 4 hard negatives), the other 1 and 2."""
    from metaembed_training.synthetic import synthetic_records

    return write_records(root / "short-last-batch.jsonl", synthetic_records(15, seed=12))


def unequal_negatives_data(root) -> dict:
    """16 records (two full global batches of 8): in each step rank 0's four records hold three hard negatives each
    and rank 1's none, so rank 0 embeds 4 + 12 candidates (6 chunks of 3), rank 1 only 4 (2 chunks). Which records
    land on which rank is read from the sampler the trainer builds (same sources, seed 0, epoch 0)."""
    from metaembed_training.data import SourceBatchSampler
    from metaembed_training.synthetic import synthetic_records

    records = synthetic_records(16, seed=12)
    sampler = SourceBatchSampler(
        [r["source"] for r in records], PER_DEVICE_BATCH, world_size=2, rank=0, seed=0, drop_last=False
    )
    on_rank_0 = {index for batch in sampler for index in batch}
    for index, record in enumerate(records):
        others = [records[(index + shift) % len(records)]["positive"] for shift in (1, 2)]
        record["negatives"] = record["negatives"] + others if index in on_rank_0 else []
    return write_records(root / "unequal-negatives.jsonl", records)


UNEVEN_DATA = {"short-last-batch": short_last_batch_data, "unequal-negatives": unequal_negatives_data}


def uneven_runs(checkpoint, root):
    """The GradCache runs under FSDP2 where the ranks' chunk counts differ in a step, one per kind of data."""
    return [
        (
            name,
            [
                "--config",
                write_recipe(
                    root / f"{name}.yaml",
                    checkpoint,
                    root / name,
                    PER_DEVICE_BATCH,
                    data=make_data(root),
                    gradcache_chunk_size=CHUNK_SIZE,
                ),
            ],
        )
        for name, make_data in UNEVEN_DATA.items()
    ]


@pytest.fixture(scope="module")
def uneven_fsdp_runs(tiny_checkpoint, tmp_path_factory):
    checkpoint = tiny_checkpoint("qwen3")
    root = tmp_path_factory.mktemp("uneven")
    # A rank left waiting in a collective fails after ddp_timeout (90 s); the queue gives up after 150 s.
    seen, errors = run_fsdp_pair(uneven_runs(checkpoint, root), timeout=150)
    return checkpoint, root, Runs(seen, errors)


def padding_chunks(record) -> list:
    """The chunks a rank ran only to keep in step: on this text-only backbone every placeholder row is padding."""
    return [chunk for chunk in record["chunks"] if chunk[1] > 0]


@pytest.mark.parametrize("name", list(UNEVEN_DATA))
def test_fsdp2_gradcache_with_unequal_chunk_counts_finishes_and_matches_one_process(uneven_fsdp_runs, name):
    """GradCache under FSDP2 where one rank has fewer chunks in a step than the other (a short last batch split
    4 + 3; hard negatives on one rank only): the rank with fewer chunks runs placeholder chunks, so both run the
    same number of forwards every step and the pair finishes; the weights equal one process on the concatenated
    batch. Before the placeholder chunks the ranks' collectives went out of step (see docs/training-fsdp2.md)."""
    checkpoint, root, seen = uneven_fsdp_runs
    ranks = [seen[name, rank] for rank in range(2)]
    assert all(record["status"] == 0 and record["distributed_type"] == "FSDP" for record in ranks)
    assert ranks[0]["forwards"] == ranks[1]["forwards"], [record["forwards"] for record in ranks]
    assert any(padding_chunks(record) for record in ranks), "the data should give the ranks unequal chunk counts"
    single = run_one_process(
        checkpoint, root, f"single-{name}", data=UNEVEN_DATA[name](root), gradcache_chunk_size=CHUNK_SIZE
    )
    expected = weights(single)
    assert any((expected[k] - v).abs().max() > 1e-3 for k, v in weights(checkpoint).items())
    assert_same_weights(weights(root / name / "final"), expected, f"FSDP2 GradCache, {name}")


def test_llama_vision_is_refused_under_fsdp_on_several_processes(tiny_checkpoint, tmp_path, monkeypatch):
    """Mllama embeds the text rows of a chunk that also holds images in a second forward, so its FSDP all-gathers per
    chunk depend on the data and no padding chunk evens them out: refused at start (run by hand: a pair whose ranks'
    query chunks are all images on one and text on the other fails in gloo with a collective size mismatch; the same
    data on Qwen2.5-VL finishes). One process, or DDP, is accepted."""
    from metaembed_training.data import ContrastiveDataset
    from metaembed_training.synthetic import synthetic_records
    from metaembed_training.trainer import MetaEmbedTrainer, MetaEmbedTrainingArguments
    from modeling_metaembed import MetaEmbedModel

    model = MetaEmbedModel.from_pretrained(tiny_checkpoint("mllama"))
    data = ContrastiveDataset(synthetic_records(8, seed=0))
    args = MetaEmbedTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    MetaEmbedTrainer(model=model, args=args, train_dataset=data)  # one process: accepted
    monkeypatch.setattr(MetaEmbedTrainingArguments, "world_size", property(lambda self: 2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=r"mllama\) cannot train under FSDP.*ddp\.yaml"):
        MetaEmbedTrainer(model=model, args=args, train_dataset=data)


# ------------------------------------------------------------------------------------ a vision backbone under FSDP2
IMAGE_RECORD = 5  # the one record whose query is an image (tests/test_training_distributed.py's mixed_records)


def write_mixed_data(root) -> dict:
    """A JSONL data file of 8 synthetic records, one of whose queries is an image (a PNG beside it): in a global
    batch of 8 split 4 + 4, one rank's half holds the image and the other's is text only."""
    import json

    from metaembed_training.synthetic import synthetic_records
    from tests.conftest import random_image

    records = synthetic_records(8, seed=12)
    random_image(seed=5).save(root / "query-5.png")
    records[IMAGE_RECORD]["query"] = {"image": "query-5.png"}
    path = root / "mixed.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return {"jsonl": [str(path)]}


def vision_runs(checkpoint, root, placeholder_image="auto"):
    """The FSDP2 run on the vision backbone: full fine-tuning, 2 SGD steps, final export."""
    data = write_mixed_data(root)
    name = f"vision-{placeholder_image}"
    path = write_recipe(
        root / f"{name}.yaml", checkpoint, root / name, PER_DEVICE_BATCH, data=data, placeholder_image=placeholder_image
    )
    return [(name, ["--config", path])]


def test_fsdp2_vision_backbone_with_the_shipped_layer_classes_exports_the_one_process_checkpoint(
    tiny_checkpoint, tmp_path
):
    """A tiny Qwen2.5-VL under FSDP2 with the shipped config's units (Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock):
    one rank's half of each batch holds an image, the other's is text only. The text-only rank's chunks carry a
    placeholder image (placeholder_image: auto), so both ranks run the vision tower's collectives and nothing hangs;
    the tower's parameters are DTensor shards; the export loads through AutoModel and equals one process on the
    whole batch, vision weights (moved by full fine-tuning) included. With placeholder_image: never the pair does
    not finish (run by hand; see docs/training-fsdp2.md)."""
    checkpoint = tiny_checkpoint("qwen2_5_vl")
    seen, errors = run_fsdp_pair(vision_runs(checkpoint, tmp_path), timeout=240, layer_classes=None)
    seen = Runs(seen, errors)
    name = "vision-auto"
    for rank in range(2):
        record = seen[name, rank]
        assert record["status"] == 0
        assert record["distributed_type"] == "FSDP" and record["all_dtensor"] and not record["ddp"]
        assert record["vision_parameters"] > 0 and record["vision_dtensor"]
        assert record["local_elements"] < 0.75 * record["global_elements"]
        units = set(record["fsdp_units"])
        assert {"FSDPQwen2_5_VLDecoderLayer", "FSDPQwen2_5_VLVisionBlock"} <= units, units
    # Each step embeds one query chunk and one candidate chunk per rank. Exactly one rank's queries hold the image
    # in each step; the other rank's query chunk, and every candidate chunk (all text), carry one placeholder image.
    by_step = {rank: [seen[name, rank]["chunks"][i : i + 2] for i in range(0, 2 * STEPS, 2)] for rank in range(2)}
    for step in range(STEPS):
        queries = {rank: by_step[rank][step][0] for rank in range(2)}
        assert all(queries[rank][0] == "query" for rank in range(2))
        with_image = [rank for rank in range(2) if queries[rank][1] == 0]
        assert len(with_image) == 1, queries
        assert queries[with_image[0]][2] == 1  # the real image, no placeholder
        assert queries[1 - with_image[0]][1:] == (1, 1), queries  # text only: one placeholder row, its image
        for rank in range(2):
            assert by_step[rank][step][1] == ("candidate", 1, 1)
    final = tmp_path / name / "final"
    assert seen[name, 0].get("written") == str(final) and seen[name, 1].get("written") is None

    single = run_one_process(checkpoint, tmp_path, "single-vision", data=write_mixed_data(tmp_path))
    expected, initial = weights(single), weights(checkpoint)
    moved = {k for k, v in initial.items() if (expected[k] - v).abs().max() > 1e-4}
    assert any("visual" in k.split(".") for k in moved), "full fine-tuning should move the vision tower"
    assert any("visual" not in k.split(".") for k in moved)
    assert_same_weights(weights(final), expected, "FSDP2 vision full fine-tuning")
    model = AutoModel.from_pretrained(final, trust_remote_code=True)
    reference = AutoModel.from_pretrained(single, trust_remote_code=True)
    from tests.conftest import random_image

    inputs = QUERIES + [random_image(seed=5), {"text": "a red square", "image": random_image(seed=7)}]
    with torch.no_grad():
        actual, wanted = (m.encode_queries(inputs, num_vectors=2) for m in (model, reference))
    torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=0)
