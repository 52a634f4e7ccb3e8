"""The Matryoshka MaxSim and the MMR loss against direct, hand-written formulas."""

import math

import pytest
import torch

from metaembed_training.loss import MatryoshkaContrastiveLoss
from metaembed_training.similarity import check_groups, matryoshka_maxsim, paired_matryoshka_maxsim

GROUPS = [(1, 1), (2, 4), (4, 8), (8, 16)]


def naive_scores(queries, candidates, groups):
    """[G, Nq, Nc] by the definition: sum over query vectors of the max over candidate vectors."""
    return torch.stack(
        [torch.einsum("qid,cjd->qcij", queries[:, :a], candidates[:, :b]).amax(-1).sum(-1) for a, b in groups]
    )


def unit(*shape, seed=0):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("block_bytes", [4 * 8 * 16 * 3, 1 << 20])  # 3 query-candidate pairs per block, or one block
def test_scores_and_gradients_match_the_definition(block_bytes):
    queries = unit(7, 8, 32, seed=1).requires_grad_()
    candidates = unit(11, 16, 32, seed=2).requires_grad_()
    weights = torch.randn(len(GROUPS), 7, 11)
    scores = matryoshka_maxsim(queries, candidates, GROUPS, max_block_bytes=block_bytes)
    (scores * weights).sum().backward()
    grad_q, grad_c = queries.grad.clone(), candidates.grad.clone()
    queries.grad = candidates.grad = None
    reference = naive_scores(queries, candidates, GROUPS)
    (reference * weights).sum().backward()
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_q, queries.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_c, candidates.grad, atol=1e-5, rtol=1e-5)


def test_vectors_beyond_the_largest_group_get_no_gradient():
    queries = unit(3, 16, 8).requires_grad_()
    candidates = unit(4, 64, 8, seed=1).requires_grad_()
    matryoshka_maxsim(queries, candidates, [(2, 4), (4, 8)]).sum().backward()
    assert queries.grad[:, 4:].abs().sum() == 0 and candidates.grad[:, 8:].abs().sum() == 0
    assert queries.grad[:, :4].abs().sum() > 0 and candidates.grad[:, :8].abs().sum() > 0


def test_paired_scores_equal_the_diagonal_of_full_scores():
    queries, candidates = unit(5, 8, 16), unit(6, 16, 16, seed=3)
    owners = torch.tensor([0, 0, 2, 4, 4, 4])
    full = naive_scores(queries, candidates, GROUPS)
    paired = paired_matryoshka_maxsim(queries, candidates, owners, GROUPS)
    torch.testing.assert_close(paired, full[:, owners, torch.arange(6)], atol=1e-5, rtol=1e-5)


def hand_loss(queries, positives, negatives, owners, groups, tau, weights):
    """Paper Eq. 6-7 written out one query at a time."""
    total = 0.0
    for g, (a, b) in enumerate(groups):
        group_loss = 0.0
        for u in range(queries.shape[0]):
            s = lambda c: float(torch.einsum("id,jd->ij", queries[u, :a], c[:b]).amax(-1).sum())  # noqa: E731
            denominator = sum(math.exp(s(p) / tau) for p in positives)
            denominator += sum(math.exp(s(n) / tau) for n, o in zip(negatives, owners) if o == u)
            group_loss += -math.log(math.exp(s(positives[u]) / tau) / denominator)
        total += weights[g] * group_loss / queries.shape[0]
    return total


def test_loss_equals_the_papers_equations_with_own_hard_negatives():
    queries, positives, negatives = unit(4, 8, 16), unit(4, 16, 16, seed=1), unit(3, 16, 16, seed=2)
    owners = torch.tensor([0, 2, 2])  # query 1 and 3 have none, query 2 has two
    weights = [1.0, 0.5, 2.0, 1.0]
    loss_fn = MatryoshkaContrastiveLoss(GROUPS, weights=weights, temperature=0.1)
    loss, per_group = loss_fn(queries, positives, negatives, owners)
    expected = hand_loss(queries, positives, negatives, owners.tolist(), GROUPS, 0.1, weights)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert list(per_group) == ["1x1", "2x4", "4x8", "8x16"]
    assert sum(w * float(v) for w, v in zip(weights, per_group.values())) == pytest.approx(expected, rel=1e-5)


def test_mean_normalization_divides_each_groups_scores_by_its_query_vectors():
    queries, positives, negatives = unit(4, 8, 16), unit(4, 16, 16, seed=1), unit(3, 16, 16, seed=2)
    owners = torch.tensor([0, 2, 2])
    _, per_group = MatryoshkaContrastiveLoss(GROUPS, temperature=0.1, score_normalization="mean")(
        queries, positives, negatives, owners
    )
    for (r_q, r_c), value in zip(GROUPS, per_group.values()):
        expected = hand_loss(queries, positives, negatives, owners.tolist(), [(r_q, r_c)], 0.1 * r_q, [1.0])
        assert value.item() == pytest.approx(expected, rel=1e-5)


def test_shared_hard_negatives_are_negatives_for_every_query():
    queries, positives, negatives = unit(3, 8, 16), unit(3, 16, 16, seed=1), unit(2, 16, 16, seed=2)
    owners = torch.tensor([0, 1])
    own, _ = MatryoshkaContrastiveLoss(GROUPS, hard_negatives="own")(queries, positives, negatives, owners)
    shared, _ = MatryoshkaContrastiveLoss(GROUPS, hard_negatives="shared")(queries, positives, negatives, owners)
    expected = hand_loss(queries, positives, list(negatives) * 3, [0, 0, 1, 1, 2, 2], GROUPS, 0.03, [1] * 4)
    assert shared.item() == pytest.approx(expected, rel=1e-5)
    assert shared.item() > own.item()


@pytest.mark.parametrize(
    "groups, message",
    [
        ([(2, 4), (1, 8)], "nested"),
        ([(1, 1), (4, 128)], "exceeds R_c"),
        ([(32, 64)], "exceeds R_q"),
        ([], "non-empty"),
        ([(0, 1)], "positive integers"),
        ([(1, 1), (1, 1)], "repeat"),
    ],
)
def test_bad_groups_are_named(groups, message):
    with pytest.raises(ValueError, match=message):
        check_groups(groups, 16, 64)


def test_bad_loss_settings_and_inputs():
    with pytest.raises(ValueError, match="one per group"):
        MatryoshkaContrastiveLoss(GROUPS, weights=[1, 1])
    with pytest.raises(ValueError, match="temperature"):
        MatryoshkaContrastiveLoss(GROUPS, temperature=0)
    with pytest.raises(ValueError, match="hard_negatives"):
        MatryoshkaContrastiveLoss(GROUPS, hard_negatives="all")
    with pytest.raises(ValueError, match="score_normalization"):
        MatryoshkaContrastiveLoss(GROUPS, score_normalization="max")
    loss_fn = MatryoshkaContrastiveLoss(GROUPS)
    with pytest.raises(ValueError, match="one positive per query"):
        loss_fn(unit(3, 8, 16), unit(2, 16, 16))
    with pytest.raises(ValueError, match="empty batch"):
        loss_fn(unit(0, 8, 16), unit(0, 16, 16))
    with pytest.raises(ValueError, match="largest group"):
        loss_fn(unit(2, 4, 16), unit(2, 16, 16))


def test_vector_redundancy_is_one_for_copies_and_near_zero_for_unrelated_vectors():
    from metaembed_training.loss import MatryoshkaContrastiveLoss, vector_redundancy

    generator = torch.Generator().manual_seed(0)
    pages, offsets = torch.randn(64, 1, 32, generator=generator), torch.randn(1, 8, 32, generator=generator)
    assert vector_redundancy(pages.expand(-1, 8, -1)).item() == pytest.approx(1.0, abs=1e-5)  # 8 copies
    copies = pages + 3 * offsets  # every vector: the page's content plus a large constant per vector k
    assert vector_redundancy(copies).item() > 0.95  # the constants are removed; the rest is one content
    unrelated = torch.randn(64, 8, 32, generator=generator)
    assert abs(vector_redundancy(unrelated).item()) < 0.05
    # In the loss: off by default (the paper's loss), a weighted term with its own entry when on.
    queries = torch.randn(4, 2, 32, generator=generator)
    positives = copies[:4].clone().requires_grad_()
    plain, groups = MatryoshkaContrastiveLoss([(1, 1), (2, 8)], temperature=0.1)(queries, positives)
    assert "redundancy" not in groups
    weighted, groups = MatryoshkaContrastiveLoss([(1, 1), (2, 8)], temperature=0.1, redundancy_weight=0.5)(
        queries, positives
    )
    torch.testing.assert_close(weighted, plain + 0.5 * groups["redundancy"])
    weighted.backward()
    assert positives.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="redundancy_weight"):
        MatryoshkaContrastiveLoss([(1, 1)], redundancy_weight=-1)
