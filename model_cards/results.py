"""Evaluation results files: the only source of the quality numbers in a model card.

Format (JSON, written by the evaluation code, read by the card renderer):

    {
      "format": "metaembed-results/1",
      "command": "the command that produced these numbers",
      "benchmarks": [
        {
          "name": "Twemoji text-to-image",                       # a column of the card's budget table
          "task": {"type": "image-retrieval", "name": "Text-to-image retrieval"},
          "dataset": {"name": "Twemoji", "type": "twemoji", "split": "test"},  # optional "config": a subset
          "metric": {"type": "recall_at_1", "name": "Recall@1"},
          "scores": {"1x1": 0.41, "2x4": 0.52, "16x64": 0.60}  # budget "r_qxr_c" -> value
        }
      ]
    }
"""

import json
from pathlib import Path

from modeling_metaembed.hub_metaembed import write_atomic

RESULTS_FORMAT = "metaembed-results/1"


class ResultsError(ValueError):
    """A results file that does not follow the format; the message names the file and the item."""


def parse_budget(key: str) -> tuple:
    """ "16x64" -> (16, 64)."""
    parts = key.split("x") if isinstance(key, str) else []
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"budget {key!r} is not of the form 'r_qxr_c' with positive integers, e.g. '16x64'")
    return int(parts[0]), int(parts[1])


def budget_key(budget) -> str:
    return f"{budget[0]}x{budget[1]}"


def _require(mapping, key, kind, where):
    value = mapping.get(key) if isinstance(mapping, dict) else None
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise ResultsError(f"{where}: '{key}' must be a non-empty {kind.__name__}")
    return value


def check_results(data, source: str = "results") -> dict:
    """Validate a results document; returns it. Raises ResultsError naming the offending benchmark and field."""
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ResultsError(f'{source}: not a results file (expected "format": "{RESULTS_FORMAT}")')
    benchmarks = data.get("benchmarks")
    if not isinstance(benchmarks, list) or not benchmarks:
        raise ResultsError(f"{source}: 'benchmarks' must be a non-empty list")
    names = set()
    for index, benchmark in enumerate(benchmarks):
        where = f"{source}: benchmark {index}"
        name = _require(benchmark, "name", str, where)
        where = f"{source}: benchmark {index} ({name!r})"
        if name in names:
            raise ResultsError(f"{where}: the name is used twice")
        names.add(name)
        for section, keys in (("task", ("type", "name")), ("dataset", ("name", "type")), ("metric", ("type", "name"))):
            for key in keys:
                _require(_require(benchmark, section, dict, where), key, str, f"{where}, {section}")
        scores = _require(benchmark, "scores", dict, where)
        if not scores:
            raise ResultsError(f"{where}: 'scores' is empty")
        for key, value in scores.items():
            try:
                parse_budget(key)
            except ValueError as error:
                raise ResultsError(f"{where}: {error}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ResultsError(f"{where}: score at budget {key} must be a number, got {value!r}")
    return data


def load_results(path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ResultsError(f"{path}: cannot read a results file: {error}") from error
    return check_results(data, str(path))


def save_results(path, benchmarks: list, command: str | None = None) -> dict:
    """Validate and write a results file atomically (a reader never sees half of it)."""
    data = {"format": RESULTS_FORMAT, "command": command, "benchmarks": benchmarks}
    check_results(data, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2) + "\n")
    return data


__all__ = [
    "RESULTS_FORMAT",
    "ResultsError",
    "check_results",
    "load_results",
    "save_results",
    "parse_budget",
    "budget_key",
]
