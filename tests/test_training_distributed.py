"""Two CPU processes (gloo) against one process on the concatenated batch: same loss, same gradients."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.loss import MatryoshkaContrastiveLoss

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


def loss_and_grads(queries, positives, negatives, hard_negatives):
    tensors = [t.clone().requires_grad_() for t in (queries, positives, negatives)]
    owners = torch.arange(queries.shape[0])
    loss_fn = MatryoshkaContrastiveLoss(GROUPS, temperature=0.05, hard_negatives=hard_negatives)
    loss, _ = loss_fn(*tensors, owners)
    loss.backward()
    return loss.detach(), [t.grad for t in tensors]


def _loss_worker(rank, world, port, hard_negatives, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        start = sum(SPLIT[:rank])
        rows = slice(start, start + SPLIT[rank])
        local = [t[rows] for t in embeddings(0)]
        loss, grads = loss_and_grads(*local, hard_negatives)
        # What data-parallel training does: average the ranks' gradients (here: of the rows each rank owns).
        queue.put((rank, loss.item(), [(g / world).numpy() for g in grads]))  # by value, not shared memory
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("hard_negatives", ["own", "shared"])
def test_two_processes_match_one_process_on_the_concatenated_batch(hard_negatives):
    full_loss, full_grads = loss_and_grads(*embeddings(0), hard_negatives)
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_loss_worker, args=(r, 2, port, hard_negatives, queue)) for r in range(2)]
    for p in processes:
        p.start()
    results = dict((rank, (loss, grads)) for rank, loss, grads in (queue.get(timeout=120) for _ in processes))
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    # The mean of the ranks' losses is the global loss.
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(full_loss.item(), abs=1e-5)
    for rank in range(2):
        start = sum(SPLIT[:rank])
        rows = slice(start, start + SPLIT[rank])
        for local, full in zip(results[rank][1], full_grads):
            torch.testing.assert_close(torch.from_numpy(local), full[rows], atol=1e-5, rtol=1e-5)


def _train_one_step(checkpoint, output_dir, per_device_batch, **distributed):
    from modeling_metaembed import MetaEmbedModel
    from training.data import ContrastiveDataset
    from training.synthetic import synthetic_records
    from training.trainer import MetaEmbedTrainer, MetaEmbedTrainingArguments

    model = MetaEmbedModel.from_pretrained(checkpoint)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = MetaEmbedTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=per_device_batch, max_steps=1, optim="sgd",
        learning_rate=1.0, max_grad_norm=0.0, logging_steps=1, lr_scheduler_type="constant", weight_decay=0.0, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, **distributed,
    )
    trainer = MetaEmbedTrainer(model=model, args=args, train_dataset=ContrastiveDataset(synthetic_records(8, seed=12)))
    trainer.train()
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)  # logged: mean over processes
    # SGD with lr 1: the update is minus the (rank-averaged) gradient.
    return loss, {n: before[n] - p.detach() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}


def _trainer_worker(rank, world, port, checkpoint, output_dir, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    loss, update = _train_one_step(checkpoint, output_dir, per_device_batch=4, ddp_backend="gloo")
    if rank == 0:
        queue.put((loss, {n: t.numpy() for n, t in update.items()}))  # by value: the process may exit first
    dist.barrier()
    dist.destroy_process_group()


def test_trainer_step_on_two_processes_equals_one_process(tiny_checkpoint, tmp_path):
    checkpoint = str(tiny_checkpoint("qwen3"))
    single_loss, single = _train_one_step(checkpoint, str(tmp_path / "single"), per_device_batch=8)
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_trainer_worker, args=(r, 2, port, checkpoint, str(tmp_path / "ddp"), queue))
        for r in range(2)
    ]
    for p in processes:
        p.start()
    loss, update = queue.get(timeout=300)
    for p in processes:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert loss == pytest.approx(single_loss, abs=1e-5)
    assert update.keys() == single.keys()
    moved = [n for n in single if single[n].abs().max() > 0]
    assert moved  # the step changed the weights
    for name in single:
        torch.testing.assert_close(torch.from_numpy(update[name]), single[name], atol=1e-5, rtol=1e-4, msg=name)
