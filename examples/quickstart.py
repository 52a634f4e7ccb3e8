"""The main job: a real MetaEmbed, trained and evaluated offline on a CPU in minutes (see metaembed/quickstart.py).

    ./run quickstart                       # the full run: prints the budget table, writes runs/quickstart/
    ./run quickstart --epochs 1 --train-pairs 256 --test-pairs 128   # a shorter one

Writes runs/quickstart/checkpoint (a Hub-ready MetaEmbed folder with its model card, eval_results.json and
budget_quality.png), runs/quickstart/budget_quality.png and runs/quickstart/summary.json.
"""

import argparse
import shlex
import sys
from dataclasses import fields

from metaembed.quickstart import QuickstartSettings, budget_table, run_quickstart


def parse_settings(argv=None) -> QuickstartSettings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = QuickstartSettings()
    for item in fields(QuickstartSettings):
        if item.name in ("budgets", "show_progress_bar"):
            continue
        flag = "--" + item.name.replace("_", "-")
        default = getattr(defaults, item.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = int if item.name in ("train_pairs", "test_pairs") else type(default)
            parser.add_argument(flag, type=kind, default=default, help=f"default: {default}")
    return QuickstartSettings(**vars(parser.parse_args(argv)))


def main(argv=None) -> None:
    settings = parse_settings(argv)
    command = "./run quickstart " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    summary = run_quickstart(settings, command=command.strip())
    print(f"\ntrained on {summary['train_pairs']} pairs in {summary['train_seconds']:.0f} s; "
          f"evaluated on {summary['test_pairs']} held-out pairs\n")  # fmt: skip
    print(budget_table(summary))
    print(f"\ncheckpoint: {summary.get('checkpoint', '(not saved)')}")
    print(f"plot: {settings.output_dir}/budget_quality.png   summary: {settings.output_dir}/summary.json")


if __name__ == "__main__":
    main()
