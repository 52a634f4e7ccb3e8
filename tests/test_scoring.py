import pytest
import torch

from modeling_metaembed import maxsim


def brute_force(queries, candidates, r_q, r_c):
    q, c = queries[:, :r_q].double(), candidates[:, :r_c].double()
    sims = torch.einsum("aid,bjd->abij", q, c)  # [Nq, Nc, r_q, r_c]
    return sims.amax(dim=3).sum(dim=2)


def unit(*shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1).to(dtype)


def test_hand_computed_value():
    # Query vectors e1, e2; candidate vectors e1, (e1 + e2)/sqrt(2), e3.
    e = torch.eye(3)
    queries = torch.stack([e[0], e[1]]).unsqueeze(0)
    candidates = torch.stack([e[0], (e[0] + e[1]) / 2**0.5, e[2]]).unsqueeze(0)
    # full budget: max(1, .707, 0) + max(0, .707, 0) = 1.7071
    assert maxsim(queries, candidates).item() == pytest.approx(1 + 2**-0.5, abs=1e-6)
    # (1, 1): <e1, e1> = 1; (2, 1): 1 + 0; (2, 2): 1 + .707
    assert maxsim(queries, candidates, budget=(1, 1)).item() == pytest.approx(1.0)
    assert maxsim(queries, candidates, budget=(2, 1)).item() == pytest.approx(1.0)
    assert maxsim(queries, candidates, budget=(2, 2)).item() == pytest.approx(1 + 2**-0.5, abs=1e-6)


@pytest.mark.parametrize("budget", [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)])
def test_matches_brute_force_at_every_budget(budget):
    queries, candidates = unit(5, 16, 32, seed=1), unit(37, 64, 32, seed=2)
    scores = maxsim(queries, candidates, budget=budget)
    assert scores.shape == (5, 37) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), brute_force(queries, candidates, *budget), atol=1e-5, rtol=0)


def test_chunking_bounds_memory_without_changing_scores():
    queries, candidates = unit(7, 4, 16, seed=3), unit(101, 8, 16, seed=4)
    whole = maxsim(queries, candidates)
    # the smallest budget that fits: one query against one candidate at a time
    tiny_blocks = maxsim(queries, candidates, max_work_bytes=8_000)
    torch.testing.assert_close(tiny_blocks, whole, atol=1e-6, rtol=0)


def test_half_precision_inputs_accumulate_in_float32():
    queries, candidates = unit(3, 16, 64, seed=5), unit(20, 64, 64, seed=6)
    scores = maxsim(queries.bfloat16(), candidates.bfloat16())
    assert scores.dtype == torch.float32
    reference = brute_force(queries.bfloat16().float(), candidates.bfloat16().float(), 16, 64)
    torch.testing.assert_close(scores.double(), reference, atol=1e-4, rtol=0)


def test_empty_inputs_give_empty_scores():
    assert maxsim(unit(0, 4, 8), unit(3, 8, 8)).shape == (0, 3)
    assert maxsim(unit(2, 4, 8), unit(0, 8, 8)).shape == (2, 0)


@pytest.mark.parametrize(
    "budget, message",
    [
        ((5, 1), "r_q=5 is outside 1..4"),
        ((1, 9), "r_c=9 is outside 1..8"),
        ((0, 1), "r_q=0"),
        ((1.5, 2), "must be an integer"),
        ((1,), "pair"),
        ("full", "pair"),
    ],
)
def test_budget_validated_against_tensors(budget, message):
    with pytest.raises(ValueError, match=message):
        maxsim(unit(2, 4, 8), unit(3, 8, 8), budget=budget)


def test_shape_errors():
    with pytest.raises(ValueError, match="dimension 8 but candidates have 16"):
        maxsim(unit(2, 4, 8), unit(3, 8, 16))
    with pytest.raises(ValueError, match=r"shape \(N, vectors, dim\)"):
        maxsim(unit(2, 8), unit(3, 8, 8))
