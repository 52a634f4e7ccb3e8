"""Model cards published with MetaEmbed checkpoints: the template (metaembed_card.md), its renderer (`card`), and
the evaluation results files its numbers come from (`results`).

May import: huggingface_hub (the card format), matplotlib (the plot) and `modeling_metaembed` (the config, atomic
writes). Used by `metaembed.hub`, `metaembed.quickstart` and the command line; never imports them.
"""

from .card import PLOT_NAME, RESULTS_NAME, budget_rows, plot_quality, render_model_card, write_model_card
from .results import RESULTS_FORMAT, ResultsError, check_results, load_results, save_results

__all__ = [
    "PLOT_NAME",
    "RESULTS_NAME",
    "RESULTS_FORMAT",
    "ResultsError",
    "budget_rows",
    "check_results",
    "load_results",
    "plot_quality",
    "render_model_card",
    "save_results",
    "write_model_card",
]
