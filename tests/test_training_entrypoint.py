"""`python -m metaembed_training.train` on the tiny recipe, and every shipped recipe parses into valid arguments."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from metaembed_training.train import load_recipe, main
from metaembed_training.trainer import MetaEmbedTrainingArguments

RECIPES = sorted((Path(__file__).parent.parent / "training" / "recipes").glob("*.yaml"))


def test_tiny_recipe_trains_evaluates_and_exports_a_loadable_checkpoint(tmp_path, capsys):
    output = tmp_path / "run"
    status = main(
        [
            "--config",
            "training/recipes/tiny-synthetic.yaml",
            f"training.output_dir={output}",
            "training.num_train_epochs=1",
            "data.synthetic.count=64",
        ]
    )
    assert status == 0
    final = output / "final"
    model = AutoModel.from_pretrained(final, trust_remote_code=True)
    embeddings = model.encode_queries(["hello world"], num_vectors=2)
    assert embeddings.shape[:2] == (1, 2) and torch.isfinite(embeddings).all()
    assert (final / "model.safetensors").exists() and not (final / "adapter_config.json").exists()


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_parses(recipe, tmp_path):
    settings = load_recipe(recipe, [f"training.output_dir={tmp_path}"])
    training = dict(settings["training"])
    training.update(use_cpu=True, bf16=False)  # this machine has no GPU; the rest must be valid as written
    args = MetaEmbedTrainingArguments(**training)
    assert args.learning_rate > 0
    if "backbone" in settings["model"]:
        assert settings["lora"] == {**settings["lora"], "r": 32, "alpha": 32}  # the paper's LoRA on every size


def test_bad_overrides_and_sections(tmp_path):
    with pytest.raises(SystemExit, match="must look like section.key=value"):
        load_recipe(RECIPES[0], ["learning_rate"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: {}\n")
    with pytest.raises(SystemExit, match=r"unknown section\(s\) \['modle'\]"):
        load_recipe(bad)
    with pytest.raises(SystemExit, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_an_existing_export_is_refused_before_training(tmp_path):
    from metaembed_training.train import main

    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_text("an earlier export")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {tiny_family: qwen3}\n"
        "data: {synthetic: {count: 16, seed: 0}}\n"
        f"training: {{output_dir: '{tmp_path / 'run'}', per_device_train_batch_size: 4, max_steps: 1, "
        "use_cpu: true, report_to: []}\n"
    )
    with pytest.raises(SystemExit, match="already holds an export"):
        main(["--config", str(recipe)])
    assert not (tmp_path / "run" / ".validated").exists()  # refused before any work
    assert (final / "model.safetensors").read_text() == "an earlier export"
