"""One definition of rank (ties and NaN count against the positive), the sharded, block-scored evaluation against a
brute-force reference, and the Trainer's `similarity()` as the one place the training scores come from."""

import pytest
import torch

from metaembed_training.data import ContrastiveDataset
from metaembed_training.evaluation import positive_ranks, recall_and_mrr, retrieval_metrics, sharded_retrieval_metrics
from metaembed_training.similarity import matryoshka_maxsim
from metaembed_training.synthetic import synthetic_records
from metaembed_training.trainer import MetaEmbedTrainer, MetaEmbedTrainingArguments, needs_vision_on_every_rank

N = 37


def test_a_constant_score_matrix_is_no_better_than_chance():
    recall, mrr = recall_and_mrr(torch.zeros(N, N))
    assert recall == 0.0  # chance is 1/N; an optimistic tie rule would say 1.0
    assert mrr == pytest.approx(1 / N)


def test_ties_and_nan_count_against_the_positive():
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [0.1, 0.2, 0.3], [float("nan"), 0.0, 0.0]])
    columns = torch.tensor([0, 1, 2, 0])
    assert positive_ranks(scores, columns).tolist() == [2, 2, 1, 3]


class TableDataset:
    """Records that carry only their index; `embed` looks their vectors up in fixed random tables."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return {"id": index}


def tables(seed=0, size=N):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(size, 4, 8, generator=generator), dim=-1)
    positives = torch.nn.functional.normalize(torch.randn(size, 8, 8, generator=generator), dim=-1)
    positives[:, :2] = 0.7 * positives[:, :2] + 0.3 * queries[:, :2]  # related pairs: ranks spread over 1..N
    positives[5] = positives[4]  # an exact duplicate candidate: ties with the positive count against it
    return queries, positives


def table_embed(queries, positives):
    def embed(records):
        ids = torch.tensor([r["id"] for r in records])
        return queries[ids], positives[ids]

    return embed


def brute_force(queries, positives, budgets):
    metrics = {}
    for r_q, r_c in budgets:
        scores = matryoshka_maxsim(queries, positives, [(r_q, r_c)])[0]
        metrics[f"recall@1_{r_q}x{r_c}"], metrics[f"mrr_{r_q}x{r_c}"] = recall_and_mrr(scores)
    return metrics


@pytest.mark.parametrize("budgets", [[(1, 1), (2, 4), (4, 8)], [(4, 2), (1, 8)]], ids=["nested", "not-nested"])
def test_block_scored_evaluation_equals_the_full_score_matrix(budgets):
    queries, positives = tables()
    # Tiny blocks and batches: many score blocks and a short last batch.
    metrics = sharded_retrieval_metrics(
        table_embed(queries, positives), TableDataset(N), budgets, batch_size=5, max_block_bytes=4 * 3 * N * 3
    )
    expected = brute_force(queries, positives, budgets)
    assert metrics.keys() == expected.keys()
    for key in expected:
        assert metrics[key] == pytest.approx(expected[key], abs=1e-6), key
    assert all(0 < value < 1 for value in expected.values())  # neither trivial nor perfect


def test_a_collapsed_model_scores_at_most_chance(tiny_model):
    """Every input embedded to the same vectors: the optimistic rule called this perfect."""
    model = tiny_model("qwen3")
    data = ContrastiveDataset(synthetic_records(12, seed=2))
    original = model.encode

    def collapsed(inputs, **kwargs):
        vectors = original(inputs, **kwargs)
        return vectors[:1].expand_as(vectors).clone()

    model.encode = collapsed
    try:
        metrics = retrieval_metrics(model, data, [(1, 1), (2, 4)])
    finally:
        del model.encode
    assert metrics["recall@1_1x1"] == 0.0 and metrics["recall@1_2x4"] == 0.0
    assert metrics["mrr_2x4"] == pytest.approx(1 / 12)


def make_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        optim="sgd",
    )
    settings.update(overrides)
    return MetaEmbedTrainingArguments(**settings)


def test_a_subclass_overriding_similarity_changes_what_trains(tiny_checkpoint, tmp_path):
    from modeling_metaembed import MetaEmbedModel

    calls = []

    class NegatedMaxSim(MetaEmbedTrainer):
        def similarity(self, queries, candidates, groups=None):
            calls.append((tuple(queries.shape), tuple(candidates.shape)))
            return -super().similarity(queries, candidates, groups)

    data = ContrastiveDataset(synthetic_records(16, seed=4))
    updates = {}
    for trainer_class in (MetaEmbedTrainer, NegatedMaxSim):
        model = MetaEmbedModel.from_pretrained(tiny_checkpoint("qwen3"))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = trainer_class(model=model, args=make_args(tmp_path), train_dataset=data)
        trainer.train()
        updates[trainer_class] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    assert len(calls) == 2  # one call per step, from the loss
    plain, negated = updates[MetaEmbedTrainer], updates[NegatedMaxSim]
    moved = [n for n in plain if plain[n].abs().max() > 0]
    assert moved and any(not torch.allclose(plain[n], negated[n]) for n in moved)


def test_the_trainer_similarity_is_the_matryoshka_maxsim_of_every_group(tiny_checkpoint, tmp_path):
    from modeling_metaembed import MetaEmbedModel

    model = MetaEmbedModel.from_pretrained(tiny_checkpoint("qwen3"))
    trainer = MetaEmbedTrainer(
        model=model, args=make_args(tmp_path), train_dataset=ContrastiveDataset(synthetic_records(8, seed=1))
    )
    queries, positives = (t.requires_grad_() for t in tables(size=6))
    scores = trainer.similarity(queries, positives, [(1, 1), (4, 8)])
    assert scores.shape == (2, 6, 6) and scores.dtype == torch.float32
    expected = torch.einsum("qid,cjd->qcij", queries, positives).amax(-1).sum(-1)
    torch.testing.assert_close(scores[1], expected)
    scores.sum().backward()  # differentiable
    assert queries.grad is not None and positives.grad is not None


class Args:
    def __init__(self, world_size, fsdp=False):
        self.world_size, self.fsdp = world_size, fsdp


def test_placeholder_images_only_where_a_rank_would_otherwise_hang(tiny_model, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    model = tiny_model("qwen2_5_vl")
    vision = [p for n, p in model.named_parameters() if n.startswith("vlm.visual")]
    original = [p.requires_grad for p in vision]
    try:
        for p in vision:
            p.requires_grad_(False)
        assert not needs_vision_on_every_rank(model, Args(1, fsdp=True))  # one process: nothing to wait for
        assert not needs_vision_on_every_rank(model, Args(2))  # DDP, frozen tower (every recipe): no placeholder
        assert needs_vision_on_every_rank(model, Args(2, fsdp=True))  # FSDP all-gathers even a frozen tower
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with an FSDP config
        assert needs_vision_on_every_rank(model, Args(2))
        monkeypatch.delenv("ACCELERATE_USE_FSDP")
        vision[0].requires_grad_(True)  # DDP with a trainable tower waits for its gradients
        assert needs_vision_on_every_rank(model, Args(2))
    finally:
        for p, flag in zip(vision, original):
            p.requires_grad_(flag)
