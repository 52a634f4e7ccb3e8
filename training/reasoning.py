"""Think-Then-Embed traces for training records, generated ahead of training through a cached reasoner.

    python -m metaembed_training.reasoning --records train.jsonl --output train.reasoned.jsonl \
        --reasoner Qwen/Qwen2.5-VL-7B-Instruct --cache runs/traces/qwen-7b [--max-new-tokens 128]
    python -m metaembed_training.reasoning ... --checkpoint runs/metaembed/final      # the embedder's own backbone

Each record's query gets a `reasoning` field (records that already have one keep it). Traces are cached by the
query's content and the reasoner's identity, so an interrupted run resumes and a second run costs nothing.
A recipe's `reasoning` section does the same inside `python -m metaembed_training.train` before the first step.
"""

import argparse
import json
import sys
from pathlib import Path

from modeling_metaembed.hub_metaembed import write_atomic
from modeling_metaembed.reasoning_metaembed import GenerativeReasoner, generate_traces

from .data import ContrastiveDataset, open_image


def add_reasoning(
    dataset: ContrastiveDataset, reasoner, cache=None, batch_size: int = 8, show_progress_bar: bool = True
) -> ContrastiveDataset:
    """A copy of `dataset` whose queries carry the reasoner's trace in `reasoning` (kept where already set)."""
    records = [dict(dataset[i]) for i in range(len(dataset))]
    todo = [i for i, record in enumerate(records) if not record["query"].get("reasoning")]
    items = []
    for i in todo:
        query = records[i]["query"]
        image = query.get("image")
        if image is not None:
            image = open_image(image, dataset.image_root, f"record {i}: query")
        items.append({"text": query.get("text"), "image": image})
    traces = generate_traces(reasoner, items, cache=cache, batch_size=batch_size, show_progress_bar=show_progress_bar)
    for i, trace in zip(todo, traces):
        records[i]["query"] = {**records[i]["query"], "reasoning": trace}
    for record in records:
        record.pop("_index", None)
    return ContrastiveDataset(records, image_root=dataset.image_root)


def build_reasoner(settings: dict, model=None):
    """The reasoner a recipe's `reasoning` section names: `reasoner: self` (the model being trained, before
    training; it needs a language-model head) or a generative checkpoint, with generation settings."""
    settings = dict(settings)
    name = settings.pop("reasoner", "self")
    settings.pop("cache", None)
    settings.pop("batch_size", None)
    if name == "self":
        if model is None:
            raise ValueError("reasoner 'self' needs the MetaEmbed model")
        return model.as_reasoner(**settings)
    return GenerativeReasoner.from_pretrained(name, **settings)


def write_jsonl(records: list, path) -> None:
    """Write records as JSON Lines atomically (PIL images cannot be written: give images as paths)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metaembed_training.reasoning", description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True, help="training records (.jsonl)")
    parser.add_argument("--output", required=True, help="the records with query reasoning (.jsonl)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--reasoner", help="a generative checkpoint (image-text-to-text or causal LM)")
    source.add_argument("--checkpoint", help="a MetaEmbed checkpoint whose own backbone reasons")
    parser.add_argument("--cache", required=True, help="trace cache folder (one per reasoner)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    from .data import load_jsonl

    dataset = load_jsonl(args.records)
    if args.checkpoint:
        from modeling_metaembed import MetaEmbedModel

        reasoner = MetaEmbedModel.from_pretrained(args.checkpoint).as_reasoner(max_new_tokens=args.max_new_tokens)
    else:
        reasoner = GenerativeReasoner.from_pretrained(args.reasoner, max_new_tokens=args.max_new_tokens)
    reasoned = add_reasoning(dataset, reasoner, cache=args.cache, batch_size=args.batch_size)
    records = [dict(reasoned[i]) for i in range(len(reasoned))]
    moved = Path(args.output).resolve().parent != Path(args.records).resolve().parent
    for record in records:
        record.pop("_index", None)
        for side in [record["query"], record["positive"]] + list(record.get("negatives") or []):
            image = side.get("image")
            if moved and isinstance(image, str) and not Path(image).is_absolute():  # keep it resolvable
                side["image"] = str((Path(args.records).resolve().parent / image))
    write_jsonl(records, args.output)
    print(f"wrote {len(records)} records with reasoning to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
