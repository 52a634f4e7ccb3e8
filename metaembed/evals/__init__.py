"""The paper's benchmarks with a budget sweep: MMEB (Precision@1) and ViDoRe v1/v2 (NDCG@5), read in their public
schemas, plus an mteb adapter. Each harness encodes once at the largest budget and scores every budget from
prefixes of the same vectors; results come as JSON and a markdown table with one row per budget.

    from metaembed.evals import mmeb, vidore, write_report
    results = mmeb.evaluate(model, source="TIGER-Lab/MMEB-eval", image_root="MMEB-eval/images")
    write_report(results, mmeb.markdown(results), "runs/mmeb")

Modules: `mmeb`, `vidore`, `mteb` (the harnesses), `metrics` (Precision@1, NDCG@k, Recall@k), `common` (the budget
sweep, data loading, unique-item encoding, reports).

May import: torch, PIL, `datasets` and `mteb` (the `eval` extra, inside the functions that need them),
`modeling_metaembed`, `training.evaluation` (ranks) and `metaembed.retrieval` (ViDoRe searches an index). Never the
other rooms or the command line.
"""

from .common import PAPER_BUDGETS, write_report

__all__ = ["PAPER_BUDGETS", "write_report"]
