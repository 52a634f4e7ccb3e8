"""Train MetaEmbed from a YAML recipe:

    python -m metaembed_training.train --config training/recipes/metaembed-7b.yaml [section.key=value ...]
    accelerate launch --config_file training/accelerate/fsdp2.yaml -m metaembed_training.train --config ...
    torchrun --nproc-per-node 8 -m metaembed_training.train --config ...

A recipe has four sections (see training/recipes/):
    model:    backbone (a VLM folder or Hub id, turned into a fresh MetaEmbed) or checkpoint (a MetaEmbed folder);
              num_query_vectors, num_candidate_vectors, matryoshka_groups, dtype, attn_implementation.
    lora:     r, alpha, dropout, include_vision, train_meta_tokens (omit the section for full fine-tuning).
    data:     jsonl (list of files), mmeb_train ({subset: parquet path} + image_root), colpali_train (parquet path),
              synthetic ({count, seed}: the built-in learnable task), holdout_fraction (eval split per source).
    training: any MetaEmbedTrainingArguments field (output_dir, per_device_train_batch_size, learning_rate, ...).
    reasoning: Think-Then-Embed (optional): reasoner (self: the model's own backbone, or a generative
              checkpoint), cache (trace folder), max_new_tokens, batch_size. Queries without a `reasoning` trace get
              one before the first step; training then conditions on it.
    export:   merged (true: also save a merged checkpoint, loadable without PEFT, to <output_dir>/final).

Overrides use dotted keys with YAML values: `training.learning_rate=5e-5 lora.r=16 data.synthetic.count=64`.
`--dry-run` builds the data and the model (on the meta device) at full size, prints the steps and what each process
will hold, and exits: a paper recipe checks offline in seconds (docs/training-dry-run.md).
Everything is checked (records, images, groups, batch sizes) before the first step.
"""

import argparse
import sys
from pathlib import Path

import yaml

from metaembed_training.building import build_data, build_model  # public here too (tests, users import them from here)

SECTIONS = ("model", "lora", "data", "reasoning", "training", "export")


def load_recipe(path, overrides=()) -> dict:
    """The recipe at `path` with dotted `key=value` overrides applied; unknown sections are an error."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: recipe {path} does not exist")
    recipe = yaml.safe_load(path.read_text()) or {}
    for override in overrides:
        if "=" not in override:
            raise SystemExit(f"error: override {override!r} must look like section.key=value")
        key, value = override.split("=", 1)
        parts = key.split(".")
        node = recipe
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SystemExit(f"error: override {override!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    unknown = set(recipe) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"error: recipe {path} has unknown section(s) {sorted(unknown)}; known: {list(SECTIONS)}")
    return recipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metaembed_training.train",
        description="Train MetaEmbed (Matryoshka multi-vector retrieval) from a recipe.",
    )
    parser.add_argument("--config", required=True, help="YAML recipe (see training/recipes/)")
    parser.add_argument("--resume", default=None, help="checkpoint folder to resume from, or 'latest'")
    parser.add_argument("--no-image-check", action="store_true", help="skip opening every image before training")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build data and model (meta device) at full size, "
        "print steps and per-rank memory estimates, and exit without training",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="dry run: processes (default: the recipe's launch comment, else 8)",
    )
    parser.add_argument(
        "--accelerate-config",
        default=None,
        help="dry run: accelerate config (DDP or FSDP2; default: the recipe's launch comment)",
    )
    parser.add_argument("--json", default=None, help="dry run: also write the estimate to this JSON file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    options = parser.parse_args(argv)
    recipe = load_recipe(options.config, options.overrides)
    if options.dry_run:
        from metaembed_training.dry_run import dry_run

        dry_run(recipe, options.config, options.num_processes, options.accelerate_config, options.json)
        return 0

    from metaembed_training.export import export_final
    from metaembed_training.lora import apply_lora
    from metaembed_training.trainer import MetaEmbedTrainer, MetaEmbedTrainingArguments
    from modeling_metaembed.folders import is_occupied

    try:
        args = MetaEmbedTrainingArguments(**(recipe.get("training") or {}))
    except TypeError as error:
        raise SystemExit(f"error: training section: {error}") from error
    final = Path(args.output_dir) / "final"
    if is_occupied(final):  # the export would refuse it, but only after the whole run
        raise SystemExit(f"error: {final} already holds an export; choose another output_dir or move it away")
    train_data, eval_data = build_data(recipe.get("data") or {})
    for data in (train_data, eval_data):  # each process checks its share; a passed check is remembered
        if data is not None:
            data.validate(
                check_images=not options.no_image_check,
                show_progress_bar=args.process_index == 0,
                rank=args.process_index,
                world_size=args.world_size,
                cache_dir=Path(args.output_dir) / ".validated",
            )
    from transformers import set_seed

    set_seed(args.seed)  # new rows (meta tokens, LoRA) start alike on every process and in every rerun
    model = build_model(recipe.get("model") or {})
    if recipe.get("reasoning") is not None:  # traces first, from the weights as they are before training
        from metaembed_training.reasoning import add_reasoning, build_reasoner

        settings = recipe["reasoning"]
        reasoner = build_reasoner(settings, model)
        trace_options = {"cache": settings.get("cache"), "batch_size": settings.get("batch_size", 8)}
        train_data = add_reasoning(train_data, reasoner, **trace_options)
        if eval_data is not None:
            eval_data = add_reasoning(eval_data, reasoner, **trace_options)
    if recipe.get("lora") is not None:
        model = apply_lora(model, **recipe["lora"])
    trainer = MetaEmbedTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data)
    resume = options.resume
    if resume == "latest":
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    if eval_data is not None:
        trainer.evaluate()
    final = export_final(trainer, recipe, final)  # every process: under FSDP it gathers the shards
    if final is not None:
        print(f"saved {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
