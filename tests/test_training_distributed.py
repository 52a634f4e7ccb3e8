"""Two CPU processes (gloo) against one process on the concatenated batch: same loss, same gradients."""

import datetime
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metaembed_training.evaluation import sharded_retrieval_metrics
from metaembed_training.loss import MatryoshkaContrastiveLoss
from tests.test_training_evaluation import TableDataset, table_embed, tables

GROUPS = [(1, 1), (2, 4), (4, 8)]
SPLIT = [3, 5]  # unequal shares: the gradient convention must still match one process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embeddings(seed):
    g = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(8, 4, 16, generator=g), dim=-1)
    positives = torch.nn.functional.normalize(torch.randn(8, 8, 16, generator=g), dim=-1)
    negatives = torch.nn.functional.normalize(torch.randn(8, 8, 16, generator=g), dim=-1)
    return queries, positives, negatives


def loss_and_grads(queries, positives, negatives, owners, hard_negatives):
    tensors = [t.clone().requires_grad_() for t in (queries, positives, negatives)]
    loss_fn = MatryoshkaContrastiveLoss(GROUPS, temperature=0.05, hard_negatives=hard_negatives)
    loss, _ = loss_fn(*tensors, owners)
    loss.backward()
    return loss.detach(), [t.grad for t in tensors]


def rank_slice(rank):
    start = sum(SPLIT[:rank])
    return slice(start, start + SPLIT[rank])


def local_batch(rank, negative_ranks):
    """This rank's rows, with its rows' hard negatives only when it is one of `negative_ranks`."""
    queries, positives, negatives = (t[rank_slice(rank)] for t in embeddings(0))
    if rank not in negative_ranks:
        negatives = negatives[:0]
    return queries, positives, negatives, torch.arange(negatives.shape[0])


def global_batch(negative_ranks):
    """The concatenated batch one process would see: every rank's rows and the negatives that exist."""
    queries, positives, negatives = embeddings(0)
    keep = [i for r in negative_ranks for i in range(*rank_slice(r).indices(len(negatives)))]
    return queries, positives, negatives[keep], torch.tensor(keep, dtype=torch.long)


SCENARIOS = [  # (hard-negative scope, the ranks whose rows have hard negatives)
    (scope, negative_ranks) for scope in ("own", "shared") for negative_ranks in [(0, 1), (0,), ()]
]


def _loss_worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A collective entered by one rank only would hang; the timeout turns that hang into a failure.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for scenario in SCENARIOS:
            hard_negatives, negative_ranks = scenario
            loss, grads = loss_and_grads(*local_batch(rank, negative_ranks), hard_negatives)
            # What data-parallel training does: average the ranks' gradients (of the rows each rank owns).
            grads = [np.zeros(0) if g is None else (g / world).numpy() for g in grads]
            queue.put((scenario, rank, loss.item(), grads))  # by value, not shared memory
        # Retrieval evaluation: each rank encodes its shard (37 records: 19 + 18, the last padded), the candidate
        # shards are broadcast in turn.
        queries, positives = tables()
        metrics = sharded_retrieval_metrics(
            table_embed(queries, positives), TableDataset(len(queries)), [(1, 1), (2, 4), (4, 8)], batch_size=4
        )
        queue.put(("evaluation", rank, metrics, None))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_concatenated_batch():
    """Every rank with hard negatives, only rank 0 with some, and none; own and shared negatives: two gloo
    processes give the loss and gradients of one process on the concatenated batch, and never hang. The sharded
    retrieval evaluation gives the one-process metrics."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_loss_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in processes:
        p.start()
    results = {}
    for _ in range(2 * len(SCENARIOS) + 2):
        scenario, rank, loss, grads = queue.get(timeout=300)
        results[scenario, rank] = (loss, grads)
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    queries, positives = tables()
    one_process = sharded_retrieval_metrics(
        table_embed(queries, positives), TableDataset(len(queries)), [(1, 1), (2, 4), (4, 8)]
    )
    for rank in range(2):
        assert results["evaluation", rank][0] == pytest.approx(one_process, abs=1e-9)
    for scenario in SCENARIOS:
        hard_negatives, negative_ranks = scenario
        full_loss, full_grads = loss_and_grads(*global_batch(negative_ranks), hard_negatives)
        # The mean of the ranks' losses is the global loss.
        mean_loss = (results[scenario, 0][0] + results[scenario, 1][0]) / 2
        assert mean_loss == pytest.approx(full_loss.item(), abs=1e-5), scenario
        negative_offset = 0
        for rank in range(2):
            rows = rank_slice(rank)
            local_queries, local_positives, local_negatives = results[scenario, rank][1]
            torch.testing.assert_close(torch.from_numpy(local_queries), full_grads[0][rows], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.from_numpy(local_positives), full_grads[1][rows], atol=1e-5, rtol=1e-5)
            count = SPLIT[rank] if rank in negative_ranks else 0
            if count:
                expected = full_grads[2][negative_offset : negative_offset + count]
                torch.testing.assert_close(torch.from_numpy(local_negatives), expected, atol=1e-5, rtol=1e-5)
            negative_offset += count


def mixed_records():
    """8 text records, one of whose queries is an image: in a global batch of 8 split 4 + 4, one rank holds an
    image chunk and the other only text."""
    from metaembed_training.synthetic import synthetic_records
    from tests.conftest import random_image

    records = synthetic_records(8, seed=12)
    records[5]["query"] = {"image": random_image(seed=5)}
    return records


def _train_one_step(
    checkpoint,
    output_dir,
    per_device_batch,
    gradcache_chunk_size=None,
    records=None,
    freeze_vision=False,
    **distributed,
):
    from metaembed_training.data import ContrastiveDataset
    from metaembed_training.synthetic import synthetic_records
    from metaembed_training.trainer import MetaEmbedTrainer, MetaEmbedTrainingArguments
    from modeling_metaembed import MetaEmbedModel

    reductions = []

    class CountingTrainer(MetaEmbedTrainer):
        """Counts DDP's gradient all-reduces (one per bucket per synchronised backward) with a comm hook."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            if hasattr(model, "register_comm_hook") and not reductions:
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                def counting_hook(state, bucket):
                    reductions.append(1)
                    return allreduce_hook(state, bucket)

                model.register_comm_hook(None, counting_hook)
                reductions.append(0)  # registered
            return super().training_step(model, inputs, num_items_in_batch)

    model = MetaEmbedModel.from_pretrained(checkpoint)
    for name, parameter in model.named_parameters():
        if freeze_vision and name.startswith("vlm.visual"):
            parameter.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = MetaEmbedTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        logging_steps=1,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        gradcache_chunk_size=gradcache_chunk_size,
        **distributed,
    )
    data = ContrastiveDataset(records if records is not None else synthetic_records(8, seed=12))
    trainer = CountingTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)  # logged: mean over processes
    # SGD with lr 1: the update is minus the (rank-averaged) gradient.
    update = {n: before[n] - p.detach() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
    # The retrieval evaluation, each process encoding its shard (9 records: 5 + 4) through the wrapped model.
    retrieval = trainer.retrieval_metrics(ContrastiveDataset(synthetic_records(9, seed=13)))
    return loss, update, sum(reductions), retrieval, trainer.data_collator.placeholder_image


def _trainer_worker(rank, world, port, checkpoint, vision_checkpoint, output_dir, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    for chunk in (None, 2):  # a plain step, then GradCache in chunks of 2 rows (2 query + 2 candidate chunks)
        loss, update, reductions, retrieval, _ = _train_one_step(
            checkpoint, f"{output_dir}-{chunk}", per_device_batch=4, gradcache_chunk_size=chunk, ddp_backend="gloo"
        )
        if rank == 0:
            queue.put((chunk, loss, {n: t.numpy() for n, t in update.items()}, reductions, retrieval))  # by value
    for frozen in (True, False):  # an image chunk on one rank, text only on the other
        loss, update, _, _, placeholder = _train_one_step(
            vision_checkpoint,
            f"{output_dir}-vision-{frozen}",
            per_device_batch=4,
            records=mixed_records(),
            freeze_vision=frozen,
            ddp_backend="gloo",
        )
        if rank == 0:
            queue.put((f"vision-frozen-{frozen}", loss, {n: t.numpy() for n, t in update.items()}, placeholder, None))
    dist.barrier()
    dist.destroy_process_group()


def test_trainer_step_on_two_processes_equals_one_process(tiny_checkpoint, tmp_path):
    """A DDP step (plain and GradCache) on two processes equals one process on the whole batch, GradCache
    reduces the gradients once per step (no_sync on every chunk but the last), as a plain step does, and the
    trainer's retrieval evaluation sharded over the two processes gives the one-process metrics."""
    checkpoint = str(tiny_checkpoint("qwen3"))
    vision_checkpoint = str(tiny_checkpoint("qwen2_5_vl"))
    single_loss, single, _, single_retrieval, _ = _train_one_step(
        checkpoint, str(tmp_path / "single"), per_device_batch=8
    )
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_trainer_worker, args=(r, 2, port, checkpoint, vision_checkpoint, str(tmp_path / "ddp"), queue)
        )
        for r in range(2)
    ]
    for p in processes:
        p.start()
    results = {}
    for _ in range(4):
        chunk, loss, update, reductions, retrieval = queue.get(timeout=300)
        results[chunk] = (loss, update, reductions, retrieval)
    for p in processes:
        p.join(timeout=120)
        assert p.exitcode == 0
    moved = [n for n in single if single[n].abs().max() > 0]
    assert moved  # the step changed the weights
    for chunk in (None, 2):
        loss, update, _, retrieval = results[chunk]
        assert loss == pytest.approx(single_loss, abs=1e-5), chunk
        assert retrieval == pytest.approx(single_retrieval, abs=1e-6), chunk  # sharded evaluation, same metrics
        assert update.keys() == single.keys()
        for name in single:
            torch.testing.assert_close(
                torch.from_numpy(update[name]), single[name], atol=1e-5, rtol=1e-4, msg=f"{name} (chunk {chunk})"
            )
    plain_reductions, gradcache_reductions = results[None][2], results[2][2]
    assert plain_reductions >= 1
    assert gradcache_reductions == plain_reductions  # 4 re-forward chunks, one reduction
    # Images on one rank, text only on the other: a frozen tower needs no placeholder (DDP waits for no gradient
    # of it); a trainable one gets a placeholder on the text-only rank. Both equal one process on the whole batch.
    for frozen in (True, False):
        loss, update, placeholder, _ = results[f"vision-frozen-{frozen}"]
        one_loss, one_update, _, _, _ = _train_one_step(
            vision_checkpoint,
            str(tmp_path / f"single-vision-{frozen}"),
            per_device_batch=8,
            records=mixed_records(),
            freeze_vision=frozen,
        )
        assert placeholder is (not frozen)
        assert loss == pytest.approx(one_loss, abs=1e-5), frozen
        vision_moved = [n for n in one_update if n.startswith("vlm.visual") and one_update[n].abs().max() > 0]
        assert bool(vision_moved) is (not frozen)
        for name in one_update:
            torch.testing.assert_close(
                torch.from_numpy(update[name]), one_update[name], atol=1e-5, rtol=1e-4, msg=f"{name} (frozen {frozen})"
            )


def _recorded_training(checkpoint, output_dir, resume=None) -> tuple:
    """Two epochs of 4 steps, gradient accumulation over 3 (so each epoch ends on a partial accumulation), saving
    every update. Returns, per micro-batch trained on, (record ids, tensors on the device, gradients synced there,
    the accelerator at the end of the data), and the number of updates."""
    from metaembed_training.data import ContrastiveDataset
    from metaembed_training.synthetic import synthetic_records
    from metaembed_training.trainer import MetaEmbedTrainer, MetaEmbedTrainingArguments
    from modeling_metaembed import MetaEmbedModel

    seen = []

    class RecordingTrainer(MetaEmbedTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            tensors = [t for chunk in inputs["queries"] + inputs["candidates"] for t in chunk["inputs"].values()]
            placed = all(t.device.type == self.args.device.type for t in tensors)
            state = self.accelerator.gradient_state
            seen.append((inputs["ids"], placed, state.sync_gradients, state.end_of_dataloader))
            return super().training_step(model, inputs, num_items_in_batch)

    args = MetaEmbedTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        num_train_epochs=2,
        dataloader_drop_last=False,
        save_strategy="steps",
        save_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo",
    )
    data = ContrastiveDataset(synthetic_records(21, seed=3, sources=2))
    trainer = RecordingTrainer(model=MetaEmbedModel.from_pretrained(checkpoint), args=args, train_dataset=data)
    collate = trainer.data_collator
    trainer.data_collator = lambda rows: {"ids": [row["id"] for row in rows], **collate(rows)}
    trainer.train(resume_from_checkpoint=resume)
    return seen, trainer.state.global_step


def _loader_worker(rank, world, port, checkpoint, output_dir, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    full, updates = _recorded_training(checkpoint, output_dir)
    resumed, _ = _recorded_training(checkpoint, output_dir + "-resumed", resume=f"{output_dir}/checkpoint-1")
    queue.put((rank, full, updates, resumed))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_processes_take_the_same_steps_over_disjoint_records_with_short_batches(tiny_checkpoint, tmp_path):
    """The trainer on two processes, 4 records each per step: two sources of 11 and 10 records give global batches
    of 8, 8, 3 (shared 2 + 1) and 2 (1 + 1), one source per step. Both processes take the same steps, their shares
    are disjoint and together hold every record once per epoch (no share dropped, padded or re-sharded), on the
    device; the epoch's last, partial accumulation syncs the gradients on both; each epoch has its own order; and a
    run resumed after the first update trains on the same batches as the uninterrupted one from there on."""
    from metaembed_training.synthetic import synthetic_records

    sources = {r["id"]: r["source"] for r in synthetic_records(21, seed=3, sources=2)}
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    checkpoint = str(tiny_checkpoint("qwen3"))
    processes = [
        context.Process(target=_loader_worker, args=(r, 2, port, checkpoint, str(tmp_path / "out"), queue))
        for r in range(2)
    ]
    for p in processes:
        p.start()
    results = {rank: rest for rank, *rest in (queue.get(timeout=300) for _ in range(2))}
    for p in processes:
        p.join(timeout=120)
        assert p.exitcode == 0
    (full_0, updates_0, resumed_0), (full_1, updates_1, resumed_1) = results[0], results[1]
    assert updates_0 == updates_1 == 4  # per epoch: 3 micro-batches, then 1
    assert len(full_0) == len(full_1) == 8
    orders = []
    for epoch in range(2):
        steps_0, steps_1 = full_0[4 * epoch : 4 * epoch + 4], full_1[4 * epoch : 4 * epoch + 4]
        sizes = []
        for (ids_0, placed_0, *_), (ids_1, placed_1, *_) in zip(steps_0, steps_1):
            assert not set(ids_0) & set(ids_1) and placed_0 and placed_1
            assert len({sources[i] for i in ids_0 + ids_1}) == 1  # one source per global batch
            sizes.append((len(ids_0), len(ids_1)))
        assert sorted(sizes) == [(1, 1), (2, 1), (4, 4), (4, 4)]
        assert sorted(i for ids, *_ in steps_0 + steps_1 for i in ids) == sorted(sources)
        for steps in (steps_0, steps_1):
            assert [sync for _, _, sync, _ in steps] == [False, False, True, True]
            assert [end for *_, end in steps] == [False, False, False, True]
        orders.append([ids for ids, *_ in steps_0])
    assert orders[0] != orders[1]
    for resumed, full in ((resumed_0, full_0), (resumed_1, full_1)):
        assert resumed == full[3:]
