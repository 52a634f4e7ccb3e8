"""The main job: a real MetaEmbed, trained and evaluated offline on a CPU in minutes (see metaembed/quickstart/).

    ./run quickstart                       # the full run (pages task): prints the budget table, writes runs/quickstart/
    ./run quickstart --task emoji          # single Twemoji <-> their names instead of pages
    ./run quickstart --epochs 1 --train-rounds 2   # a shorter one

Writes runs/quickstart/checkpoint (a Hub-ready MetaEmbed folder with its model card, eval_results.json and
budget_quality.png), runs/quickstart/budget_quality.png and runs/quickstart/summary.json.
"""

import argparse
import shlex
import sys
from dataclasses import fields

from metaembed.quickstart import TASKS, QuickstartSettings, budget_table, candidate_count, run_quickstart


def parse_settings(argv=None) -> QuickstartSettings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for item in fields(QuickstartSettings):
        if item.name in ("budgets", "show_progress_bar"):
            continue
        flag = "--" + item.name.replace("_", "-")
        default = item.default  # the field's own default (None where it depends on the task)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif item.name == "task":
            parser.add_argument(flag, choices=TASKS, default=default, help=f"default: {default}")
        else:
            kind = int if item.name in ("train_pairs", "test_pairs", "image_size") else type(default)
            if item.name in ("meta_learning_rate", "attention_learning_rate"):  # "none": with the text encoder
                kind = lambda value: None if value.lower() == "none" else float(value)  # noqa: E731
            if item.name == "meta_regions":  # "none": every meta token reads the whole page
                kind = lambda value: None if value.lower() == "none" else value  # noqa: E731
            shown = "per task: 192 (pages), 96 (emoji)" if item.name == "image_size" else default
            parser.add_argument(flag, type=kind, default=default, help=f"default: {shown}")
    return QuickstartSettings(**vars(parser.parse_args(argv)))


def main(argv=None) -> None:
    settings = parse_settings(argv)
    command = "./run quickstart " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    summary = run_quickstart(settings, command=command.strip())
    what = "pages of training emoji" if settings.task == "pages" else "training pairs"
    print(
        f"\ntrained on {what} in {summary['train_seconds']:.0f} s (whole run {summary['total_seconds']:.0f} s); "
        f"each query ranked against {candidate_count(summary)} held-out candidates\n"
    )
    print(budget_table(summary))
    print(f"\ncheckpoint: {summary.get('checkpoint', '(not saved)')}")
    print(f"plot: {settings.output_dir}/budget_quality.png   summary: {settings.output_dir}/summary.json")


if __name__ == "__main__":
    main()
