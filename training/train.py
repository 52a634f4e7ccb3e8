"""Train MetaEmbed from a YAML recipe:

    python -m training.train --config training/recipes/metaembed-7b.yaml [section.key=value ...]
    accelerate launch --config_file training/accelerate/fsdp2.yaml -m training.train --config ...
    torchrun --nproc-per-node 8 -m training.train --config ...

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
Everything is checked (records, images, groups, batch sizes) before the first step.
"""

import argparse
import sys
from pathlib import Path

import yaml

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


def build_model(settings: dict):
    import torch

    from modeling_metaembed import MetaEmbedModel

    settings = dict(settings)
    dtype = settings.pop("dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if "checkpoint" in settings:
        return MetaEmbedModel.from_pretrained(settings.pop("checkpoint"), dtype=dtype)
    if "tiny_family" in settings:  # a tiny random backbone (tests, smoke runs): no download
        import tempfile

        from modeling_metaembed.testing import make_tiny_checkpoint

        family = settings.pop("tiny_family")
        folder = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="tiny-metaembed-")), family=family, **settings)
        return MetaEmbedModel.from_pretrained(folder, dtype=dtype)
    if "backbone" not in settings:
        raise SystemExit("error: the model section needs a backbone, a checkpoint or a tiny_family")
    return MetaEmbedModel.from_vlm(settings.pop("backbone"), dtype=dtype, **settings)


def build_data(settings: dict):
    from training.data import ContrastiveDataset, load_colpali_train, load_jsonl, load_mmeb_train, split_holdout
    from training.synthetic import synthetic_records

    parts = []
    for path in settings.get("jsonl", []) or []:
        parts.append(load_jsonl(path))
    if settings.get("mmeb_train"):
        mmeb = dict(settings["mmeb_train"])
        parts.append(load_mmeb_train(mmeb["subsets"], image_root=mmeb["image_root"]))
    if settings.get("colpali_train"):
        parts.append(load_colpali_train(settings["colpali_train"]))
    if settings.get("synthetic"):
        parts.append(ContrastiveDataset(synthetic_records(**settings["synthetic"])))
    if not parts:
        raise SystemExit("error: the data section names no data (jsonl, mmeb_train, colpali_train or synthetic)")
    dataset = parts[0] if len(parts) == 1 else _concatenate(parts)
    fraction = settings.get("holdout_fraction")
    if fraction:
        return split_holdout(dataset, fraction=fraction, seed=settings.get("holdout_seed", 0))
    return dataset, None


def _concatenate(parts):
    from training.data import ContrastiveDataset

    records = [dict(part[i], _image_root=part.image_root) for part in parts for i in range(len(part))]
    for record in records:  # resolve relative image paths per part, so one dataset can hold them all
        root = record.pop("_image_root")
        record.pop("_index", None)
        if root is not None:
            for side in [record["query"], record["positive"]] + list(record.get("negatives") or []):
                image = side.get("image")
                if isinstance(image, str) and not Path(image).is_absolute():
                    side["image"] = str(Path(root) / image)
    return ContrastiveDataset(records)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.train", description="Train MetaEmbed (Matryoshka multi-vector retrieval) from a recipe."
    )
    parser.add_argument("--config", required=True, help="YAML recipe (see training/recipes/)")
    parser.add_argument("--resume", default=None, help="checkpoint folder to resume from, or 'latest'")
    parser.add_argument("--no-image-check", action="store_true", help="skip opening every image before training")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    options = parser.parse_args(argv)
    recipe = load_recipe(options.config, options.overrides)

    from training.lora import apply_lora, save_adapter, save_merged
    from training.trainer import MetaEmbedTrainer, MetaEmbedTrainingArguments

    try:
        args = MetaEmbedTrainingArguments(**(recipe.get("training") or {}))
    except TypeError as error:
        raise SystemExit(f"error: training section: {error}") from error
    train_data, eval_data = build_data(recipe.get("data") or {})
    train_data.validate(check_images=not options.no_image_check, show_progress_bar=True)
    model = build_model(recipe.get("model") or {})
    if recipe.get("reasoning") is not None:  # traces first, from the weights as they are before training
        from training.reasoning import add_reasoning, build_reasoner

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
    if trainer.is_world_process_zero():
        final = Path(args.output_dir) / "final"
        if recipe.get("lora") is not None:
            peft_model = trainer.accelerator.unwrap_model(trainer.model)
            if (recipe.get("export") or {}).get("merged", True):
                save_merged(peft_model, final)
            else:
                save_adapter(peft_model, final)
        else:
            trainer.save_model(str(final))
        print(f"saved {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
