"""`python -m metaembed_training.train --config RECIPE --dry-run`: data and model at full size without weights or data
files, step counts as a real run computes them, and per-rank memory estimates (training/dry_run.py)."""

import json
import math
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import yaml

from metaembed_training.data import SourceBatchSampler
from metaembed_training.dry_run import StandInImage, StandInRecords, dry_run, standin_dataset
from metaembed_training.train import build_data, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "training" / "recipes"
QWEN_7B_PUBLISHED = 8_292_166_656  # huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct (safetensors metadata, LM head included)

# Runs the dry run in a fresh process and reports its memory from /proc/self/status afterwards.
MEASURE = """
import sys
from metaembed_training.train import main
code = main(sys.argv[1:])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("MEMORY_KB", int(status["RssAnon"].split()[0]), int(status["VmHWM"].split()[0]))
sys.exit(code)
"""


def _lora_parameters(config: dict, r: int) -> int:
    """LoRA A and B of q, k, v, o, gate, up, down in every language-model layer: r * (in + out) each."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    return config["num_hidden_layers"] * sum(r * (i + o) for i, o in shapes)


def test_7b_dry_run_offline_at_full_size(tmp_path):
    out = tmp_path / "estimate.json"
    recipe_path = RECIPES / "metaembed-7b.yaml"
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, "--config", str(recipe_path), "--dry-run", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer steps" in result.stdout and "<- this recipe" in result.stdout
    report = json.loads(out.read_text())
    model, memory, steps = report["model"], report["memory"], report["steps"]

    # Parameters: the published Qwen2.5-VL-7B minus its untied LM head, plus LoRA (r = 32) and the 80 meta-token rows.
    config = json.loads((RECIPES / "backbones" / "Qwen2.5-VL-7B-Instruct" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    backbone = QWEN_7B_PUBLISHED - config["vocab_size"] * config["hidden_size"]
    assert model["backbone_parameters"] == backbone == 7_747_169_280
    extras = _lora_parameters(config, r=32) + (16 + 64) * config["hidden_size"]
    assert model["embedding_rows_added"] == 0  # 151,665 + 80 ids fit in the 152,064 rows
    assert model["trainable_parameters"] == extras
    assert model["parameters"] == backbone + extras

    # No tensor of the model's size was allocated: 7.8B bf16 parameters would be 14.6 GiB.
    rss_anon_kb, peak_kb = map(int, result.stdout.split("MEMORY_KB")[1].split())
    model_kb = model["parameter_bytes"] / 1024
    assert model_kb > 14 * 1024**2
    assert rss_anon_kb < model_kb / 5 and peak_kb < model_kb / 5, (rss_anon_kb, peak_kb)

    # FSDP2 over the launch comment's 32 processes: parameters, gradients and AdamW state are sharded.
    n = report["launch"]["num_processes"]
    assert (n, report["launch"]["strategy"]) == (32, "fsdp2")
    per_rank = memory["per_rank_bytes"]
    assert per_rank["parameters"] * n == model["parameter_bytes"]
    assert per_rank["gradients"] * n == model["trainable_bytes"] == 4 * extras  # float32 LoRA weights
    assert per_rank["optimizer_adamw"] * n == 2 * model["trainable_bytes"]
    acts = memory["activations_bytes"]
    assert acts["gradcache_and_gradient_checkpointing"] < acts["gradcache"] < acts["plain"]
    assert acts["gradient_checkpointing"] < acts["plain"]
    assert memory["recipe_mode"] == "gradcache_and_gradient_checkpointing"

    # Steps: the stand-in's sources after the 1% holdout, through SourceBatchSampler, one epoch.
    recipe = load_recipe(recipe_path)
    expected = recipe["data"]["expected_sizes"]
    train_counts = {name: sizes["records"] - max(1, round(sizes["records"] * 0.01)) for name, sizes in expected.items()}
    assert report["data"]["train_records"] == sum(train_counts.values())
    global_batch = 48 * 32
    assert steps["batches_per_epoch"] == sum(count // global_batch for count in train_counts.values())
    sources = [name for name, count in train_counts.items() for _ in range(count)]
    sampler = SourceBatchSampler(sources, batch_size=48, world_size=32, drop_last=True)
    assert steps["optimizer_steps"] == len(sampler) == steps["batches_per_epoch"]


def test_ddp_and_process_count_options(tmp_path, capsys):
    recipe_path = RECIPES / "metaembed-7b.yaml"
    report = dry_run(load_recipe(recipe_path), recipe_path, num_processes=8, accelerate_config="ddp.yaml")
    assert (report["launch"]["num_processes"], report["launch"]["strategy"]) == (8, "ddp")
    per_rank = report["memory"]["per_rank_bytes"]
    assert per_rank["parameters"] == report["model"]["parameter_bytes"]  # DDP: a whole copy per rank
    assert report["steps"]["global_batch"] == 48 * 8
    assert "8 process(es), DDP" in capsys.readouterr().out


def test_tiny_recipe_dry_run(tmp_path):
    recipe_path = RECIPES / "tiny-synthetic.yaml"
    recipe = load_recipe(recipe_path)
    out = tmp_path / "tiny.json"
    report = dry_run(recipe, recipe_path, json_path=out)
    assert json.loads(out.read_text())["steps"] == report["steps"]
    assert report["launch"]["num_processes"] == 1  # use_cpu and no launch comment
    train, _ = build_data(recipe["data"])  # the real loader: the dry run counts the same records
    assert report["data"]["train_records"] == len(train)
    batches = len(SourceBatchSampler(train.sources, batch_size=16, drop_last=False))
    assert report["steps"]["optimizer_steps"] == batches * 2
    assert report["memory"]["assumptions"]["image_tokens"] == 0  # the synthetic task is text-only


def test_standin_records_are_made_on_access():
    sizes = {"records": 5, "query_image": [640, 480], "positive_image": None}
    tracemalloc.start()
    small = StandInRecords([("a", sizes)])
    before = tracemalloc.get_traced_memory()[0]
    huge = StandInRecords([("a", sizes), ("b", dict(sizes, records=10**12))])
    dataset = standin_dataset([("a", sizes), ("b", dict(sizes, records=10**12))])
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 64 * 1024, grown  # a trillion records cost no more memory than five
    assert len(small) == 5 and len(huge) == len(dataset) == 10**12 + 5
    last = dataset[10**12 + 4]
    assert last["source"] == "b" and dataset.sources[10**12 + 4] == "b" and dataset.sources[4] == "a"
    assert last["query"]["image"] == StandInImage(640, 480) and last["positive"]["image"] is None
    assert len(last["negatives"]) == 1
    assert small[3] == small[3]  # deterministic


def test_loaders_ignore_the_dry_run_keys():
    data = {
        "synthetic": {"count": 40, "sources": 2},
        "holdout_fraction": 0.1,
        "expected_sizes": {"other": {"records": 10, "query_image": None, "positive_image": [64, 64]}},
    }
    train, held = build_data(data)
    assert len(train) + len(held) == 40
    assert Counter(train.sources) == Counter({"source-0": 18, "source-1": 18})
    for path in RECIPES.glob("*.yaml"):  # every recipe still loads and its expected sizes are well formed
        recipe = load_recipe(path)
        for name, sizes in ((recipe.get("data") or {}).get("expected_sizes") or {}).items():
            assert isinstance(sizes["records"], int) and sizes["records"] > 0, (path, name)
            assert math.prod(sizes.get("query_image") or [1]) > 0
    assert yaml.safe_load((RECIPES / "backbones" / "backbones.yaml").read_text())
