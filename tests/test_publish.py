"""Model cards from results files, the exact upload folder, uploads (recorded, not sent), and a user's offline
load by repo id from a Hub cache."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
import torch
from PIL import Image

from metaembed.hub.publish import PublishError, check_publishable, publish, stage_checkpoint
from metaembed_model_cards import RESULTS_NAME, ResultsError, load_results, render_model_card, save_results
from modeling_metaembed import MetaEmbedConfig, MetaEmbedModel

BENCHMARKS = [
    {
        "name": "Held-out captions",
        "task": {"type": "image-retrieval", "name": "Text-to-image retrieval"},
        "dataset": {"name": "Tiny captions", "type": "tiny-captions", "split": "test"},
        "metric": {"type": "recall_at_1", "name": "Recall@1"},
        "scores": {"1x1": 0.3125, "2x4": 0.5, "4x8": 0.6875},
    },
    {
        "name": "Held-out images",
        "task": {"type": "text-retrieval", "name": "Image-to-text retrieval"},
        "dataset": {"name": "Tiny captions", "type": "tiny-captions", "split": "test"},
        "metric": {"type": "mrr", "name": "MRR"},
        "scores": {"1x1": 0.41, "4x8": 0.77},
    },
]


@pytest.fixture()
def checkpoint(tiny_checkpoint, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint("qwen2_5_vl"), folder)
    save_results(folder / RESULTS_NAME, BENCHMARKS, command="python -m quickstart")
    (folder / "optimizer.pt").write_bytes(b"not for the Hub")
    (folder / "trainer_state.json").write_text("{}")
    return folder


def test_card_numbers_come_from_the_results_file(checkpoint):
    config = MetaEmbedConfig.from_pretrained(checkpoint)
    results = load_results(checkpoint / RESULTS_NAME)
    card = render_model_card(
        config, results, repo_id="org/metaembed-tiny", license="apache-2.0", base_model="org/backbone"
    )
    metadata = huggingface_hub.ModelCard(card).data.to_dict()
    assert metadata["library_name"] == "transformers" and metadata["base_model"] == "org/backbone"
    assert "metaembed" in metadata["tags"] and metadata["license"] == "apache-2.0"
    metrics = [m for entry in metadata["model-index"][0]["results"] for m in entry["metrics"]]
    assert len(metrics) == 5  # one per benchmark and measured budget
    assert {"type": "recall_at_1", "value": 0.6875, "name": "Recall@1 at budget (4, 8)"} in metrics
    # The budget table: cost columns computed from the config (D = 64, bf16), quality from the file.
    assert "| (4, 8) | 1.0 KiB | 4.10 k | 0.6875 | 0.77 |" in card
    assert "| (2, 4) | 512 B | 1.02 k | 0.5 | – |" in card
    assert "python -m quickstart" in card and 'AutoModel.from_pretrained("org/metaembed-tiny"' in card
    changed = json.loads(json.dumps(results))
    changed["benchmarks"][0]["scores"]["4x8"] = 0.25
    assert "| (4, 8) | 1.0 KiB | 4.10 k | 0.25 | 0.77 |" in render_model_card(config, changed)


def test_card_without_results_reports_no_quality(tiny_checkpoint):
    card = render_model_card(MetaEmbedConfig.from_pretrained(tiny_checkpoint("qwen2_5_vl")))
    assert "not been evaluated" in card and "model-index" not in card and "budget_quality.png" not in card


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[0]["scores"].update({"4by8": 0.5}), "benchmark 0 .*'4by8'"),
        (lambda b: b[1]["scores"].update({"1x1": "high"}), "benchmark 1 .*must be a number"),
        (lambda b: b[1].pop("metric"), "benchmark 1 .*'metric'"),
        (lambda b: b.append(dict(b[0])), "benchmark 2 .*used twice"),
    ],
)
def test_bad_results_files_are_refused_naming_the_item(tmp_path, mutate, message):
    benchmarks = json.loads(json.dumps(BENCHMARKS))
    mutate(benchmarks)
    with pytest.raises(ResultsError, match=message):
        save_results(tmp_path / "results.json", benchmarks)
    assert not (tmp_path / "results.json").exists()


def test_dry_run_writes_the_exact_upload_folder(checkpoint, tmp_path):
    staged, commit = publish(checkpoint, "org/metaembed-tiny", dry_run_dir=tmp_path / "upload", license="apache-2.0")
    assert commit is None
    files = set(os.listdir(staged))
    code = {
        "configuration_metaembed.py",
        "modeling_metaembed.py",
        "processing_metaembed.py",
        "scoring_metaembed.py",
        "hub_metaembed.py",
        "sentence_metaembed.py",
    }
    assert code <= files
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "modules.json",
        "config_sentence_transformers.json",
        "README.md",
        "budget_quality.png",
        RESULTS_NAME,
    } <= files
    assert not {"optimizer.pt", "trainer_state.json"} & files  # training leftovers stay home
    config = json.loads((staged / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_metaembed.MetaEmbedModel"
    with Image.open(staged / "budget_quality.png") as plot:
        assert plot.format == "PNG" and plot.width > 300
    assert "![Quality against retrieval budget](budget_quality.png)" in (staged / "README.md").read_text()


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda f: (f / "sentence_metaembed.py").unlink(), "sentence_metaembed.py"),
        (lambda f: (f / "scoring_metaembed.py").unlink(), "scoring_metaembed.py .*imported by"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 20), "model.safetensors is unreadable"),
        (lambda f: (f / "processor_config.json").unlink(), "processor_config.json"),
    ],
)
def test_incomplete_checkpoints_are_refused(checkpoint, tmp_path, breakage, message):
    breakage(checkpoint)
    with pytest.raises(PublishError, match=message):
        stage_checkpoint(checkpoint, tmp_path / "upload")
    assert not (tmp_path / "upload").exists()  # no half-staged folder left behind
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_module_refs_to_the_installed_package_are_rewritten_to_the_root_file(checkpoint, tmp_path):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "modeling_metaembed.sentence_metaembed.MetaEmbedModule"}]
    (checkpoint / "modules.json").write_text(json.dumps(modules))
    stage_checkpoint(checkpoint, tmp_path / "upload")
    staged = json.loads((tmp_path / "upload" / "modules.json").read_text())
    assert staged[0]["type"] == "sentence_metaembed.MetaEmbedModule"
    (tmp_path / "upload" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(PublishError, match="root"):
        check_publishable(tmp_path / "upload")


class RecordingHub:
    """Stands in for the Hub's HTTP API: records calls and what the uploaded folder held at upload time."""

    def __init__(self, monkeypatch):
        self.calls = []
        hub = self

        def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
            hub.calls.append(("create_repo", repo_id, private))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
            hub.calls.append(("create_branch", repo_id, branch))

        def upload_folder(self, repo_id, folder_path, revision=None, create_pr=False, commit_message=None, **kwargs):
            hub.files = sorted(os.listdir(folder_path))
            hub.card = open(os.path.join(folder_path, "README.md"), encoding="utf-8").read()
            hub.calls.append(("upload_folder", repo_id, revision, create_pr))
            return "commit-url"

        for name, method in (
            ("create_repo", create_repo),
            ("create_branch", create_branch),
            ("upload_folder", upload_folder),
        ):
            monkeypatch.setattr(huggingface_hub.HfApi, name, method)


def test_publish_creates_the_repo_and_uploads_the_staged_folder(checkpoint, tmp_path, monkeypatch):
    hub = RecordingHub(monkeypatch)
    staged, commit = publish(checkpoint, "org/metaembed-tiny", private=True, revision="v1", license="apache-2.0")
    assert staged is None and commit == "commit-url"
    assert hub.calls == [
        ("create_repo", "org/metaembed-tiny", True),
        ("create_branch", "org/metaembed-tiny", "v1"),
        ("upload_folder", "org/metaembed-tiny", "v1", False),
    ]
    publish(checkpoint, "org/metaembed-tiny", dry_run_dir=tmp_path / "dry")
    assert hub.files == sorted(os.listdir(tmp_path / "dry"))  # the dry run shows exactly what is uploaded
    with pytest.raises(PublishError, match="org/name"):
        publish(checkpoint, "no-namespace")


def test_model_push_to_hub_uploads_what_save_pretrained_writes_with_its_card(checkpoint, monkeypatch):
    hub = RecordingHub(monkeypatch)
    model = MetaEmbedModel.from_pretrained(checkpoint)
    model.model_card = "---\nlicense: apache-2.0\n---\n# a card\n"
    model.push_to_hub("org/metaembed-tiny", create_pr=True)
    assert hub.calls[-1] == ("upload_folder", "org/metaembed-tiny", None, True)
    assert hub.card == model.model_card
    assert {"modules.json", "sentence_metaembed.py", "model.safetensors", "config.json"} <= set(hub.files)


def test_a_loaded_checkpoint_keeps_its_card_when_saved_again(checkpoint, tmp_path):
    stage_checkpoint(checkpoint, tmp_path / "upload")
    model = MetaEmbedModel.from_pretrained(tmp_path / "upload")
    assert model.model_card == (tmp_path / "upload" / "README.md").read_text()
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_text() == model.model_card


USER_MACHINE = textwrap.dedent(
    """
    import sys, importlib.abc

    class BlockPackage(importlib.abc.MetaPathFinder):  # a user's machine: only the Hub files
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_metaembed", "training", "metaembed", "model_cards"):
                raise ImportError(f"{name} is not installed on a user's machine")

    sys.meta_path.insert(0, BlockPackage())
    import torch
    from sentence_transformers import MultiVectorEncoder
    from transformers import AutoModel

    repo_id, out, again = sys.argv[1:4]
    model = AutoModel.from_pretrained(repo_id, trust_remote_code=True)
    # A fine-tuner's save: still a sentence-transformers checkpoint. Before the encoder loads, whose module file
    # would then sit in the same code cache as the model's.
    model.save_pretrained(again)
    encoder = MultiVectorEncoder(repo_id, trust_remote_code=True)
    texts = ["a query about cats", "a second, longer query about dogs"]
    torch.save({
        "model": model.encode(texts, role="query"),
        "encoder": torch.stack(encoder.encode_query(texts)),
        "saved again": torch.stack(MultiVectorEncoder(again, trust_remote_code=True).encode_query(texts)),
        "card": model.model_card,
    }, out)
    """
)


def test_users_load_a_published_checkpoint_by_repo_id_from_the_hub_cache_offline(checkpoint, tmp_path):
    staged, _ = publish(checkpoint, "org/metaembed-7b", dry_run_dir=tmp_path / "upload")
    # The Hub cache as a download leaves it: models--org--name/snapshots/<commit>/ and refs/main.
    home = tmp_path / "hf_home"
    repo = home / "hub" / "models--org--metaembed-7b"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(staged, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(home / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", USER_MACHINE, "org/metaembed-7b", str(tmp_path / "out.pt"), str(tmp_path / "again")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    expected = MetaEmbedModel.from_pretrained(checkpoint).encode(
        ["a query about cats", "a second, longer query about dogs"], role="query"
    )
    torch.testing.assert_close(out["model"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["encoder"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["saved again"], expected, atol=1e-5, rtol=0)
    assert out["card"] == (staged / "README.md").read_text()
    assert (tmp_path / "again" / "sentence_metaembed.py").read_text() == (staged / "sentence_metaembed.py").read_text()


def test_card_of_a_text_only_backbone_is_a_text_feature_extractor(tiny_checkpoint):
    card = render_model_card(MetaEmbedConfig.from_pretrained(tiny_checkpoint("qwen3")))
    metadata = huggingface_hub.ModelCard(card).data.to_dict()
    assert metadata["pipeline_tag"] == "feature-extraction" and "multimodal" not in metadata["tags"]
    assert '"a document"' in card and "image" not in card.split("## Usage")[1].split("### sentence")[0]


def test_the_quickstart_card_gives_each_query_kind_its_own_task_entry(tiny_checkpoint):
    from metaembed.quickstart.evaluation import METRIC_NAMES
    from metaembed.quickstart.report import results_benchmarks

    kinds = ("one item", "two items", "picture")
    summary = {
        "settings": {"task": "pages", "page_grid": 2, "test_rounds": 2},
        "test_pairs": 368,
        "quality": {
            kind: {m: {"1x1": 0.1 + i / 10, "4x16": 0.2 + i / 10} for m in METRIC_NAMES} for i, kind in enumerate(kinds)
        },
    }
    results = {"format": "metaembed-results/1", "benchmarks": results_benchmarks(summary)}
    card = render_model_card(MetaEmbedConfig.from_pretrained(tiny_checkpoint("qwen2_5_vl")), load_results_dict(results))
    entries = huggingface_hub.ModelCard(card).data.to_dict()["model-index"][0]["results"]
    # The Hub merges results of one task type and dataset: before, every kind's metrics sat under the first kind.
    assert [entry["dataset"]["config"] for entry in entries] == ["one-item", "two-items", "picture"]
    assert entries[2]["task"]["name"] == "Picture-to-page retrieval, queries showing one item's picture"
    assert entries[0]["task"]["name"] == "Text-to-page retrieval, queries naming one item"
    assert all(len(entry["metrics"]) == 2 * len(METRIC_NAMES) for entry in entries)
    picture = {m["value"] for m in entries[2]["metrics"]}
    assert picture == {0.1 + 2 / 10, 0.2 + 2 / 10}  # the picture kind's own numbers


def load_results_dict(results: dict) -> dict:
    from metaembed_model_cards.results import check_results

    return check_results(results, "results")
