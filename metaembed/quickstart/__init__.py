"""The quickstart, the project's main job: a real MetaEmbed trained offline on CPU and measured at every budget.

- `job`: the job itself (`run_quickstart`: build, warm-start, train, evaluate, save a Hub-ready checkpoint).
- `settings`: `QuickstartSettings`, every flag of `./run quickstart`.
- `evaluation`: Recall@1 and MRR per query group at every budget; each held-out query's rank of its page.
- `report`: the printed budget table, the scoring time per query it shows, and the model-card results.
- `pages`: the Twemoji pages task (layout, rendering, training records, held-out rounds).
- `twemoji`: the packaged Twemoji images and names, and their fixed train / test split.
- `backbones`: the LiteVL backbone built from packaged pretrained weights (MiniLM, EfficientNet-Lite0).
- `frozen_features`: the frozen tower computed once per image, and the closed-form projector start.

May import: torch, PIL, transformers, `modeling_metaembed`, `training` (the trainer and its evaluation) and
`model_cards`. Never the other rooms of `metaembed` or the command line. Reference baselines, probes and the seeds
runs are not here: they live in `examples/` (closed_form_references.py, probe_vectors.py, reproduce_claims.py).
"""

from .job import RANKS_NAME, build_model, load_data, run_quickstart
from .report import budget_table, candidate_count
from .settings import TASKS, QuickstartSettings

__all__ = [
    "QuickstartSettings",
    "TASKS",
    "run_quickstart",
    "budget_table",
    "candidate_count",
    "build_model",
    "load_data",
    "RANKS_NAME",
]
