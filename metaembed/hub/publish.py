"""Publishing a checkpoint to the Hugging Face Hub: stage the exact folder to upload, check it, upload it.

The staged folder is the checkpoint's files (training leftovers left out) with its model card rendered from
the evaluation results, and every piece a user's `from_pretrained(..., trust_remote_code=True)` or
`MultiVectorEncoder(...)` needs checked to be there. `--dry-run` stops after staging and checking.
"""

import json
import re
import shutil
import tempfile
from pathlib import Path

from safetensors import safe_open

from metaembed_model_cards import RESULTS_NAME, write_model_card
from modeling_metaembed.folders import save_folder_atomically
from modeling_metaembed.hub_metaembed import upload_folder_to_hub

# Files a Trainer checkpoint holds that are not part of a published model.
TRAINING_LEFTOVERS = re.compile(
    r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth|trainer_state\.json|training_args\.bin|"
    r"\..*|.*\.tmp)$"
)
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", flags=re.MULTILINE)


class PublishError(ValueError):
    """The folder is not a publishable MetaEmbed checkpoint; the message names what is missing or broken."""


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise PublishError(f"{path.name}: cannot read JSON: {error}") from error


def _check_code_file(folder: Path, module: str, needed_by: str) -> None:
    path = folder / f"{module}.py"
    if not path.is_file():
        raise PublishError(f"code file {path.name} (needed by {needed_by}) is missing")
    for imported in RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8")):
        if not (folder / f"{imported}.py").is_file():
            raise PublishError(f"code file {imported}.py (imported by {path.name}) is missing")


def _check_weights(folder: Path) -> list:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise PublishError("model.safetensors.index.json lists no weight files")
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise PublishError("no weights: neither model.safetensors nor model.safetensors.index.json")
    for shard in shards:
        if not (folder / shard).is_file():
            raise PublishError(f"weight file {shard} (listed by the index) is missing")
        try:
            with safe_open(folder / shard, framework="pt") as weights:
                if not list(weights.keys()):
                    raise PublishError(f"weight file {shard} holds no tensors")
        except PublishError:
            raise
        except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
            raise PublishError(f"weight file {shard} is unreadable: {error}") from error
    return shards


def check_publishable(folder) -> list:
    """Raise PublishError unless `folder` holds a complete MetaEmbed checkpoint; return its file names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder")
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    if not isinstance(config, dict) or config.get("model_type") != "metaembed":
        raise PublishError("config.json is missing or is not a MetaEmbed config (model_type 'metaembed')")
    auto_map = config.get("auto_map") or {}
    for auto_class in ("AutoConfig", "AutoModel"):
        if auto_class not in auto_map:
            raise PublishError(f"config.json auto_map has no {auto_class} entry")
        _check_code_file(folder, auto_map[auto_class].split(".")[0], f"config.json auto_map {auto_class}")
    processor_config = folder / "processor_config.json"
    if not processor_config.is_file():
        raise PublishError("processor_config.json is missing")
    processor_map = (_read_json(processor_config).get("auto_map") or {}).get("AutoProcessor")
    if not processor_map:
        raise PublishError("processor_config.json auto_map has no AutoProcessor entry")
    _check_code_file(folder, processor_map.split(".")[0], "processor_config.json")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise PublishError("no tokenizer files (tokenizer.json / tokenizer_config.json)")
    modules = _read_json(folder / "modules.json") if (folder / "modules.json").is_file() else None
    if not isinstance(modules, list) or not modules:
        raise PublishError("modules.json (sentence-transformers) is missing or empty")
    for module in modules:
        module_file, _, class_name = str(module.get("type", "")).rpartition(".")
        if "." in module_file or not class_name:
            raise PublishError(
                f"modules.json names {module.get('type')!r}: a module must be named by its file at the "
                "checkpoint root (e.g. 'sentence_metaembed.MetaEmbedModule')"
            )
        _check_code_file(folder, module_file, "modules.json")
    if not (folder / "config_sentence_transformers.json").is_file():
        raise PublishError("config_sentence_transformers.json is missing")
    _check_weights(folder)
    card = folder / "README.md"
    if not card.is_file() or not card.read_text(encoding="utf-8").startswith("---\n"):
        raise PublishError("README.md (the model card, with YAML metadata) is missing")
    return sorted(path.name for path in folder.iterdir() if path.is_file())


def _root_module_refs(folder: Path) -> None:
    """A sentence-transformers save of an encoder built from the installed package names the module by its
    package path ('modeling_metaembed.sentence_metaembed.MetaEmbedModule'); on the Hub it must be the root file."""
    path = folder / "modules.json"
    if not path.is_file():
        return
    modules = _read_json(path)
    changed = False
    for module in modules if isinstance(modules, list) else []:
        module_type = str(module.get("type", ""))
        if module_type.count(".") > 1 and (folder / f"{module_type.split('.')[-2]}.py").is_file():
            module["type"] = ".".join(module_type.split(".")[-2:])
            changed = True
    if changed:
        path.write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")


def stage_checkpoint(checkpoint, output_dir, *, results=None, **card_kwargs) -> list:
    """Write the exact upload folder to `output_dir` (which must not exist or be empty): the checkpoint's files
    without training leftovers, module refs at the root, the card rendered from `results` (default: the
    checkpoint's eval_results.json). Returns the staged file names; raises PublishError when incomplete, in
    which case `output_dir` is left as it was (the folder is built aside and moved into place when complete)."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if not checkpoint.is_dir():
        raise PublishError(f"checkpoint {checkpoint} is not a folder")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise PublishError(f"output folder {output_dir} is not empty")
    if results is None and (checkpoint / RESULTS_NAME).is_file():
        results = checkpoint / RESULTS_NAME
    staged = []

    def build(folder: Path) -> None:
        for path in sorted(checkpoint.iterdir()):
            if path.is_file() and not TRAINING_LEFTOVERS.match(path.name):
                shutil.copy2(path, folder / path.name)
        _root_module_refs(folder)
        write_model_card(folder, results, **card_kwargs)
        staged.extend(check_publishable(folder))  # raising here leaves output_dir untouched

    save_folder_atomically(build, output_dir)
    return staged


def publish(
    checkpoint,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token=None,
    dry_run_dir=None,
    results=None,
    **card_kwargs,
):
    """Stage and check the checkpoint, then upload it (`create_repo` + `upload_folder`). With `dry_run_dir`,
    stage there and upload nothing. Returns (staged folder or None, upload result or None)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id or ""):
        raise PublishError(f"repo id {repo_id!r} is not of the form 'org/name'")
    card_kwargs.setdefault("repo_id", repo_id)
    if dry_run_dir is not None:
        stage_checkpoint(checkpoint, dry_run_dir, results=results, **card_kwargs)
        return Path(dry_run_dir), None
    with tempfile.TemporaryDirectory(prefix="metaembed-publish-") as staging:
        stage_checkpoint(checkpoint, Path(staging) / "upload", results=results, **card_kwargs)
        commit = upload_folder_to_hub(
            Path(staging) / "upload", repo_id, private, revision, create_pr, commit_message, token
        )
    return None, commit


__all__ = ["PublishError", "check_publishable", "stage_checkpoint", "publish"]
