"""`python -m metaembed_training.train --config RECIPE --dry-run`: what a recipe's run will hold, without training.

In seconds, offline, on a CPU machine:

1. **Data**, built lazily at full size: the recipe's data where it is on disk (through `training.building.build_data`,
   the loader a real run uses); for each part that is absent, a synthetic stand-in with the record count and image
   sizes the recipe declares under `data.expected_sizes` (records generated on access, never held in memory;
   images never decoded). The held-out split and the one-source batches are those of a real run
   (`split_holdout`, `SourceBatchSampler`), so the optimizer-step count is the real one.
2. **Model**, built on the meta device at full size (no weights, no tokenizer): the backbone's config shipped in
   `training/recipes/backbones/` (see `backbones.yaml`), MetaEmbed's meta tokens and projection, and LoRA applied
   with PEFT exactly as `training.lora.apply_lora` does in a real run.
3. **Memory per rank** (estimates, see `estimate_memory`): parameters, gradients, AdamW state, activations with
   and without gradient checkpointing and GradCache, embeddings and MaxSim score blocks; DDP or FSDP2 sharding.

Nothing here allocates a tensor of the model's size: every parameter lives on the meta device.
"""

import bisect
import glob
import json
import math
import re
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

BACKBONES_DIR = Path(__file__).resolve().parent / "recipes" / "backbones"
ACCELERATE_DIR = Path(__file__).resolve().parent / "accelerate"
DEFAULT_NUM_PROCESSES = 8
# Keys `data.expected_sizes` entries may hold (see the recipes): records, and each side's typical image size.
EXPECTED_SIZE_KEYS = ("records", "query_image", "positive_image", "negative_image", "negatives")
# Text lengths the activation estimate assumes (tokens of text per input, chat template and instruction included).
# Assumptions, not measurements: MMEB queries carry an instruction plus a question or caption; candidates are
# mostly a caption, a class name or nothing (an image).
QUERY_TEXT_TOKENS = 128
CANDIDATE_TEXT_TOKENS = 64
ACTIVATION_BYTES = 2  # bf16 / fp16 activations (the recipes train with bf16 autocast)
GIB = 1024**3
# How far measured memory may be from the estimate, per component, as checked on CPU by
# tests/test_training_memory_plan.py (table in docs/training.md). "step" is what a training step adds on top of the
# weights, gradients and optimizer state: activations (in the recipe's mode) + embeddings + MaxSim scores.
ESTIMATE_MARGINS = {"parameters": 0.01, "gradients": 0.01, "optimizer_adamw": 0.01, "step": 0.30}
ROLES = ("query", "positive", "negative")
SAMPLED_RECORDS = 64  # records of on-disk data read to see which sides carry images


# ----------------------------------------------------------------------------------------------- launch settings
def launch_settings(recipe_path, num_processes=None, accelerate_config=None, use_cpu=False) -> dict:
    """Processes and sharding of the run: explicit options first, else the recipe's `accelerate launch` comment
    (`--config_file training/accelerate/X.yaml --num_processes N`), else 1 process for a `use_cpu` recipe and 8
    otherwise, with DDP."""
    text = Path(recipe_path).read_text(encoding="utf-8")
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    if num_processes is None:
        found = re.search(r"--num_processes[ =](\d+)", comments)
        num_processes = int(found.group(1)) if found else (1 if use_cpu else DEFAULT_NUM_PROCESSES)
    if accelerate_config is None:
        found = re.search(r"--config_file[ =](\S+\.yaml)", comments)
        accelerate_config = found.group(1) if found else None
    strategy = "ddp"
    if accelerate_config is not None:
        path = Path(accelerate_config)
        if not path.is_file():
            path = ACCELERATE_DIR / path.name
        settings = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
        fsdp_version = (settings.get("fsdp_config") or {}).get("fsdp_version")
        if settings.get("distributed_type") == "FSDP":
            strategy = "fsdp2" if fsdp_version == 2 else "fsdp"
    if num_processes < 1:
        raise SystemExit(f"error: --num-processes must be at least 1, got {num_processes}")
    return {"num_processes": num_processes, "strategy": strategy, "accelerate_config": accelerate_config}


# --------------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class StandInImage:
    """An image of a stand-in record: only its size. Never decoded (the dry run opens no image)."""

    width: int
    height: int


class StandInRecords:
    """Records of the recipe's absent data parts, generated on access from their index: `len()` is the full
    declared count, yet no record is held in memory. `parts` is [(source, expected sizes dict), ...]."""

    def __init__(self, parts: list):
        self.parts = [(source, dict(sizes)) for source, sizes in parts]
        self.ends = []
        total = 0
        for source, sizes in self.parts:
            records = sizes.get("records")
            if not isinstance(records, int) or records < 1:
                raise SystemExit(f"error: data.expected_sizes.{source}.records must be a positive integer")
            total += records
            self.ends.append(total)

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def _part(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"stand-in record {index} out of range 0..{len(self) - 1}")
        return bisect.bisect_right(self.ends, index)

    def source(self, index: int) -> str:
        return self.parts[self._part(index)][0]

    def __getitem__(self, index: int) -> dict:
        part = self._part(index)
        source, sizes = self.parts[part]
        local = index - (self.ends[part - 1] if part else 0)

        def side(role: str, text: str) -> dict:
            size = sizes.get(f"{role}_image")
            return {"text": text, "image": StandInImage(*size) if size else None}

        record = {
            "id": f"stand-in-{source}-{local}",
            "source": source,
            "query": side("query", f"stand-in query {local} of {source}"),
            "positive": side("positive", f"stand-in candidate {local} of {source}"),
        }
        negatives = sizes.get("negatives", 1)
        if negatives:
            record["negatives"] = [side("negative", f"stand-in hard negative {local}.{k}") for k in range(negatives)]
        return record


class StandInSources:
    """Each stand-in record's source name, computed from the index (a sequence, not a list)."""

    def __init__(self, records: StandInRecords):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> str:
        return self.records.source(index)

    def __iter__(self):
        start = 0
        for (source, _), end in zip(self.records.parts, self.records.ends):
            for _ in range(start, end):
                yield source
            start = end


def standin_dataset(parts: list):
    """A `ContrastiveDataset` over `StandInRecords(parts)`: full size, records made on access."""
    from metaembed_training.data import ContrastiveDataset

    records = StandInRecords(parts)
    return ContrastiveDataset(records, sources=StandInSources(records))


def _exists(pattern) -> bool:
    return bool(glob.glob(str(pattern)))


def split_data_settings(settings: dict) -> tuple:
    """(settings naming only the data present on disk or built in, [(source, expected sizes)] of absent parts).
    A part is absent when its file (or glob) matches nothing; it then needs an `expected_sizes` entry."""
    expected = settings.get("expected_sizes") or {}
    present = {k: v for k, v in settings.items() if k not in ("jsonl", "mmeb_train", "colpali_train", "expected_sizes")}
    absent = []

    def need(source: str, what: str):
        if source not in expected:
            raise SystemExit(
                f"error: {what} is not on disk and data.expected_sizes has no entry {source!r} for a stand-in"
            )
        unknown = set(expected[source]) - set(EXPECTED_SIZE_KEYS)
        if unknown:
            raise SystemExit(f"error: data.expected_sizes.{source} has unknown key(s) {sorted(unknown)}")
        absent.append((source, expected[source]))

    files = []
    for path in settings.get("jsonl") or []:
        if _exists(path):
            files.append(path)
        else:
            need(Path(path).stem, f"jsonl file {path}")
    if files:
        present["jsonl"] = files
    if settings.get("mmeb_train"):
        mmeb = dict(settings["mmeb_train"])
        subsets = {}
        for name, path in (mmeb.get("subsets") or {}).items():
            if isinstance(path, (str, Path)) and not _exists(path):
                need(name, f"MMEB-train subset {name} ({path})")
            else:
                subsets[name] = path
        if subsets:
            present["mmeb_train"] = dict(mmeb, subsets=subsets)
    if settings.get("colpali_train"):
        path = settings["colpali_train"]
        if isinstance(path, (str, Path)) and not _exists(path):
            need("colpali_train", f"the ColPali train set ({path})")
        else:
            present["colpali_train"] = path
    return present, absent


def build_dry_data(settings: dict) -> dict:
    """Train/held-out sources of the recipe's data: the real loaders for what is on disk, stand-ins for the rest."""
    from metaembed_training.building import build_data
    from metaembed_training.data import split_holdout

    present, absent = split_data_settings(settings)
    fraction = settings.get("holdout_fraction")
    train_sources, held_out, parts, samples = [], 0, [], []
    has_real = any(present.get(k) for k in ("jsonl", "mmeb_train", "colpali_train", "synthetic"))
    if has_real:
        train, held = build_data(present)
        train_sources += list(train.sources)
        samples = [train[i] for i in range(min(SAMPLED_RECORDS, len(train)))]
        held_out += len(held) if held is not None else 0
        parts.append({"kind": "on disk", "train_records": len(train), "held_out": len(held) if held else 0})
    if absent:
        standin = standin_dataset(absent)
        if fraction:
            train, held = split_holdout(standin, fraction=fraction, seed=settings.get("holdout_seed", 0))
        else:
            train, held = standin, None
        train_sources += list(train.sources)
        held_out += len(held) if held is not None else 0
        parts.append(
            {
                "kind": "stand-in",
                "sources": {source: sizes.get("records") for source, sizes in absent},
                "train_records": len(train),
                "held_out": len(held) if held is not None else 0,
                "sample_record": _describe(standin[0]),
            }
        )
    if not train_sources:
        raise SystemExit("error: the data section names no data (jsonl, mmeb_train, colpali_train or synthetic)")
    images = {role: any(sizes.get(f"{role}_image") is not None for _, sizes in absent) for role in ROLES}
    negatives = [sizes.get("negatives", 1) for _, sizes in absent]
    for record in samples:  # a few records of the data on disk (no image is opened)
        for role in ROLES:
            sides = (record.get("negatives") or []) if role == "negative" else [record[role]]
            images[role] = images[role] or any(side.get("image") is not None for side in sides)
        negatives.append(len(record.get("negatives") or []))
    return {
        "train_sources": train_sources,
        "train_records": len(train_sources),
        "held_out_records": held_out,
        "parts": parts,
        "images": images,
        "negatives": max(negatives or [1]),
        "has_real_data": has_real,
    }


def _describe(record: dict) -> dict:
    def side(s):
        image = s.get("image")
        size = [image.width, image.height] if isinstance(image, StandInImage) else image
        return {"text": s.get("text"), "image": size}

    out = {"source": record["source"], "query": side(record["query"]), "positive": side(record["positive"])}
    if record.get("negatives"):
        out["negatives"] = [side(n) for n in record["negatives"]]
    return out


def count_steps(train_sources, args, num_processes: int) -> dict:
    """Optimizer steps of the run, as `MetaEmbedTrainer` + `transformers.Trainer` count them: `SourceBatchSampler`'s
    `len()` batches per epoch (one-source global batches, drop_last as the recipe says), then gradient accumulation
    and epochs (or `max_steps`)."""
    from metaembed_training.data import SourceBatchSampler

    sampler = SourceBatchSampler(
        train_sources,
        batch_size=args["per_device_train_batch_size"],
        world_size=num_processes,
        drop_last=args["dataloader_drop_last"],
    )
    batches = len(sampler)
    accumulation = args["gradient_accumulation_steps"]
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    if args["max_steps"] > 0:
        steps = args["max_steps"]
    else:
        steps = math.ceil(args["num_train_epochs"] * per_epoch)
    return {
        "global_batch": args["per_device_train_batch_size"] * num_processes,
        "batches_per_epoch": batches,
        "gradient_accumulation_steps": accumulation,
        "optimizer_steps_per_epoch": per_epoch,
        "epochs": args["num_train_epochs"],
        "optimizer_steps": steps,
        "drop_last": args["dataloader_drop_last"],
    }


def training_arguments(settings: dict) -> dict:
    """The recipe's training section over `MetaEmbedTrainingArguments`' defaults, as plain values (no accelerator,
    device or output folder is set up: the dry run must not touch the machine's GPUs)."""
    from metaembed_training.trainer import MetaEmbedTrainingArguments

    known = {f.name: f for f in fields(MetaEmbedTrainingArguments)}
    unknown = set(settings) - set(known)
    if unknown:
        raise SystemExit(f"error: training section: unknown argument(s) {sorted(unknown)}")
    values = {name: f.default for name, f in known.items() if f.init and not callable(f.default)}
    values.update(settings)
    return values


# -------------------------------------------------------------------------------------------------------- model
def backbone_index() -> dict:
    """`backbones.yaml`: Hub id -> {config (folder of a config.json), tokenizer_length, published_parameters}."""
    return yaml.safe_load((BACKBONES_DIR / "backbones.yaml").read_text(encoding="utf-8")) or {}


def _meta_config(settings: dict):
    """(MetaEmbedConfig, dtype, backbone note) for the recipe's model section, built without weights."""
    import torch
    from transformers import AutoConfig

    from modeling_metaembed import MetaEmbedConfig

    settings = dict(settings)
    dtype = settings.pop("dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    if "tiny_family" in settings:  # tiny random checkpoints are written (small) and read back as configs
        from transformers.utils import logging as hf_logging

        from modeling_metaembed.testing import make_tiny_checkpoint

        family = settings.pop("tiny_family")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report and progress bar are not part of the dry run's output
        hf_logging.disable_progress_bar()
        try:
            folder = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="tiny-metaembed-")), family=family, **settings)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        return MetaEmbedConfig.from_pretrained(folder), dtype, {"backbone": f"tiny {family}", "published": None}
    if "checkpoint" in settings:
        checkpoint = settings.pop("checkpoint")
        if not (Path(checkpoint) / "config.json").is_file():
            raise SystemExit(f"error: the dry run needs a local checkpoint folder with a config.json, got {checkpoint}")
        return MetaEmbedConfig.from_pretrained(checkpoint), dtype, {"backbone": checkpoint, "published": None}
    backbone = settings.pop("backbone", None)
    if backbone is None:
        raise SystemExit("error: the model section needs a backbone, a checkpoint or a tiny_family")
    index = backbone_index()
    if backbone in index:
        entry = index[backbone]
        folder = BACKBONES_DIR / entry["config"]
        tokenizer_length = entry["tokenizer_length"]
    elif (Path(backbone) / "config.json").is_file():
        from transformers import AutoTokenizer

        folder, entry = Path(backbone), {}
        tokenizer_length = len(AutoTokenizer.from_pretrained(backbone))
    else:
        raise SystemExit(
            f"error: no config for backbone {backbone!r}: add its config.json under {BACKBONES_DIR} and an entry "
            f"in backbones.yaml (known: {sorted(index)})"
        )
    vlm_config = AutoConfig.from_pretrained(folder)
    for key in ("seed", "trust_remote_code", "attn_implementation"):  # loading options, not config fields
        settings.pop(key, None)
    config = MetaEmbedConfig(vlm_config=vlm_config, **settings)
    # from_vlm appends the R_q + R_c meta tokens after the tokenizer's vocabulary.
    first = tokenizer_length
    config.query_meta_token_ids = list(range(first, first + config.num_query_vectors))
    config.candidate_meta_token_ids = list(
        range(first + config.num_query_vectors, first + config.num_query_vectors + config.num_candidate_vectors)
    )
    note = {
        "backbone": backbone,
        "config_file": str(folder / "config.json"),
        "published": entry.get("published_parameters"),
        "published_source": entry.get("published_source"),
    }
    return config, dtype, note


def build_meta_model(model_settings: dict, lora_settings: dict | None):
    """The recipe's MetaEmbed (and its LoRA wrapper) on the meta device, at full size; returns (model, info)."""
    import torch
    from transformers import AutoModel

    from modeling_metaembed import MetaEmbedModel
    from modeling_metaembed.modeling_metaembed import BACKBONES_SHIPPED_HERE

    config, dtype, note = _meta_config(model_settings)
    with torch.device("meta"):
        shipped = BACKBONES_SHIPPED_HERE.get(config.vlm_config.model_type)
        vlm = shipped[0](config.vlm_config) if shipped else AutoModel.from_config(config.vlm_config, dtype=dtype)
        backbone_parameters = sum(p.numel() for p in vlm.parameters())
        new_ids = list(config.query_meta_token_ids or []) + list(config.candidate_meta_token_ids or [])
        rows = vlm.get_input_embeddings().weight.shape[0]
        if new_ids and max(new_ids) >= rows:  # as from_vlm: resize only when the spare rows do not suffice
            vlm.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
        model = MetaEmbedModel(config, vlm=vlm)
        model.to(dtype)
        lora_note = None
        if lora_settings is not None:
            from metaembed_training.lora import apply_lora

            model = apply_lora(model, **lora_settings)
            lora_note = dict(lora_settings)
    parameters = list(model.parameters())
    trainable = [p for p in parameters if p.requires_grad]
    if any(not p.is_meta for p in parameters):
        raise RuntimeError("the dry run built a parameter off the meta device")
    info = dict(
        note,
        dtype=str(dtype).replace("torch.", ""),
        backbone_parameters=backbone_parameters,
        embedding_rows_added=max(0, (max(new_ids) + 1 - rows) if new_ids else 0),
        parameters=sum(p.numel() for p in parameters),
        trainable_parameters=sum(p.numel() for p in trainable),
        parameter_bytes=sum(p.numel() * p.element_size() for p in parameters),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        trainable_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in trainable}),
        largest_block_bytes=_largest_block_bytes(model),
        qk_norm=any(name.split(".")[-1] in ("q_norm", "k_norm") for name, _ in model.named_modules()),
        lora=lora_note,
    )
    return model, config, info


def _largest_block_bytes(model) -> int:
    """Bytes of the largest repeated block (decoder layer or vision block): what FSDP all-gathers at a time."""
    from torch import nn

    largest = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                largest = max(largest, sum(p.numel() * p.element_size() for p in block.parameters()))
    return largest


# ------------------------------------------------------------------------------------------------------- memory
def activation_bytes(info: dict, args: dict) -> int:
    """Bytes of one activation element: 2 under bf16 / fp16 autocast, else the parameters' element size (a float32
    model without autocast, as on CPU, keeps float32 activations)."""
    if args.get("bf16") or args.get("fp16"):
        return ACTIVATION_BYTES
    return {"float32": 4, "float64": 8}.get(info["dtype"], ACTIVATION_BYTES)


def estimate_memory(
    info: dict, config, args: dict, launch: dict, data: dict, lora: dict | None, text_tokens: tuple | None = None
) -> dict:
    """Bytes per rank of what the run holds, as estimates. All formulas are here. `text_tokens`: (query, candidate)
    text tokens per row, replacing the assumed QUERY_TEXT_TOKENS / CANDIDATE_TEXT_TOKENS (tests pass measured ones).

    Parameters / gradients / optimizer (exact counts from the meta model, estimates of what is resident):
      parameters = sum(numel * element size) over every parameter (frozen ones in the recipe's dtype; PEFT keeps
          LoRA weights in float32);  gradients = the same over trainable parameters only;
      AdamW = exp_avg + exp_avg_sq per trainable parameter, each in the parameter's dtype (torch.optim.AdamW
          allocates zeros_like(param)): 2 x 4 bytes for float32 LoRA weights. No extra fp32 master copy: the
          Trainer's AdamW updates trainable parameters in place, in their own dtype;
      FSDP2 shards all three over the N ranks (/ N) and all-gathers one block at a time (x2 with prefetch);
      DDP keeps everything whole and adds gradient buckets (about the gradient bytes again).

    Activations (per-layer per-token counts in the style of Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models", with FlashAttention: no [heads, L, L] score matrix is kept):
      a = 2 bytes (bf16 / fp16 autocast; else the parameters' element size, `activation_bytes`), h = hidden, h_kv = KV heads x head dim, I = MLP intermediate, n_h = heads.
      h_q = heads x head dim. One decoder layer keeps, per token, for its backward (counted with saved-tensor hooks
      on a Qwen3 layer, tests/test_training_memory_plan.py):
        each RMSNorm: its input in float32 (4 h bytes: the upcast under autocast) and its normalized output (a h);
        attention: q/k/v input h, q h_q, k h_kv, v h_kv (after rotary: the attention kernel's inputs), attention
          output (o_proj input) h_q; with per-head q/k norms (Qwen3) also their inputs and outputs: (4 + a)(h_q + h_kv)
        MLP (SwiGLU/GeGLU): gate/up input h, gate I, up I, act(gate) I, act(gate)*up (down input) I
        -> 2 (4 + a) h + a * (2h + 2 h_q + 2 h_kv + 4I) [+ (4 + a)(h_q + h_kv)] + 4 n_h (FlashAttention's float32
        log-sum-exp). The last norm (one more RMSNorm, (4 + a) h per token) is counted once.
        LoRA with dropout p > 0 adds, per adapted Linear, the dropped-out input (a bytes) and its mask (1 byte) per
        input feature, plus the rank-r intermediate (a * r): (a + 1) * (6h + I) + 7 a r for q,k,v,o,gate,up,down.
      Without gradient checkpointing: tokens x layers x per-layer bytes.
      With gradient checkpointing (one checkpoint per decoder layer): tokens x layers x a h (each layer's input)
        + tokens x per-layer bytes (one layer recomputed in the backward). Both add the last norm.
      The vision tower is frozen and upstream of every trainable parameter (LoRA on the language model only), so it
      keeps nothing for the backward; its transient working memory is not counted.
      Tokens (worst case: every row padded to the longest): a query = text + visual tokens (when any data part has
      query images) + its meta tokens; a candidate = text + max_image_tokens visual tokens + its meta tokens.
      Rows per step: B queries, B (1 + negatives) candidates. With GradCache only one chunk of `gradcache_chunk_size`
      rows keeps a graph at a time.
    Embeddings (float32, with their gradients, x2): local queries B R_q D, local candidates B (1 + negatives) R_c D,
      and the positives gathered from the other ranks (N - 1) B R_c D.
    MaxSim: two blocks of token similarities (the backward of `matryoshka_maxsim`), each at most
      `similarity_block_mb` and at most the whole [B R_q, (N B + B negatives) R_c] float32 matrix, + the float32
      scores and their gradients, G groups x B queries x (N B + B negatives) candidates.
    """
    n = launch["num_processes"]
    sharded = launch["strategy"].startswith("fsdp")
    shard = n if sharded else 1
    text = config.get_text_config()
    h = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    h_kv = getattr(text, "num_key_value_heads", None) or heads
    h_kv *= head_dim
    h_q = heads * head_dim
    intermediate = text.intermediate_size
    layers = text.num_hidden_layers
    a = activation_bytes(info, args)

    norm = (4 + a) * h  # an RMSNorm keeps its float32 input and its normalized output
    per_layer = 2 * norm + a * (2 * h + 2 * h_q + 2 * h_kv + 4 * intermediate) + 4 * heads
    if info.get("qk_norm"):
        per_layer += (4 + a) * (h_q + h_kv)
    if lora and lora.get("dropout", 0.0) > 0:
        per_layer += (a + 1) * (6 * h + intermediate) + 7 * a * lora.get("r", 32)
    elif lora:
        per_layer += 7 * a * lora.get("r", 32)
    layer_input = a * h

    batch = args["per_device_train_batch_size"]
    negatives = args["max_negatives"] if args.get("max_negatives") is not None else data["negatives"]
    image_tokens = config.max_image_tokens if _has_vision(config) else 0
    query_images = data["images"]["query"]
    if not any(data["images"].values()):  # text-only data: no visual tokens on either side
        image_tokens = 0
    query_text, candidate_text = text_tokens or (QUERY_TEXT_TOKENS, CANDIDATE_TEXT_TOKENS)
    query_tokens = query_text + (image_tokens if query_images else 0) + len(config.meta_tokens("query"))
    candidate_tokens = candidate_text + image_tokens + len(config.meta_tokens("candidate"))
    query_rows, candidate_rows = batch, batch * (1 + negatives)

    def activations(q_rows, c_rows, checkpointing):
        tokens = q_rows * query_tokens + c_rows * candidate_tokens
        if not checkpointing:
            return tokens * (layers * per_layer + norm)
        return tokens * (layers * layer_input + per_layer + norm)

    chunk = args.get("gradcache_chunk_size")
    chunk_rows = chunk or max(query_rows, candidate_rows)
    # GradCache: one chunk (queries or candidates, whichever is longer) keeps a graph at a time.
    longest = max(query_tokens, candidate_tokens)

    def gradcache(checkpointing):
        tokens = chunk_rows * longest
        if not checkpointing:
            return tokens * (layers * per_layer + norm)
        return tokens * (layers * layer_input + per_layer + norm)

    d = config.output_dim
    r_q, r_c = config.num_query_vectors, config.num_candidate_vectors
    embeddings = 2 * 4 * d * (query_rows * r_q + candidate_rows * r_c + (n - 1) * batch * r_c)
    groups = len(args.get("matryoshka_groups") or config.matryoshka_groups)
    columns = n * batch + batch * negatives  # candidates each query is scored against
    block = min(args["similarity_block_mb"] * 1024**2, 4 * batch * r_q * columns * r_c)  # bounded float32 block
    scores = 2 * block + 2 * 4 * groups * batch * columns

    optimizer_bytes = 2 * info["trainable_bytes"]  # exp_avg + exp_avg_sq, zeros_like(param)
    held = {
        "parameters": info["parameter_bytes"] / shard,
        "gradients": info["trainable_bytes"] / shard,
        "optimizer_adamw": optimizer_bytes / shard,
        "fsdp_unsharded_blocks": 2 * info["largest_block_bytes"] if sharded else 0,
        "ddp_gradient_buckets": info["trainable_bytes"] if not sharded and n > 1 else 0,
    }
    act = {
        "plain": activations(query_rows, candidate_rows, False),
        "gradient_checkpointing": activations(query_rows, candidate_rows, True),
        "gradcache": gradcache(False),
        "gradcache_and_gradient_checkpointing": gradcache(True),
    }
    recipe_mode = (
        ("gradcache" if chunk else "plain")
        if not args.get("gradient_checkpointing")
        else ("gradcache_and_gradient_checkpointing" if chunk else "gradient_checkpointing")
    )
    static = sum(held.values()) + embeddings + scores
    return {
        "num_processes": n,
        "strategy": launch["strategy"],
        "assumptions": {
            "query_tokens": query_tokens,
            "candidate_tokens": candidate_tokens,
            "query_text_tokens": query_text,
            "candidate_text_tokens": candidate_text,
            "activation_bytes": a,
            "image_tokens": image_tokens,
            "query_rows": query_rows,
            "candidate_rows": candidate_rows,
            "gradcache_chunk_rows": chunk,
            "activation_bytes_per_token_per_layer": per_layer,
            "layers": layers,
            "hidden_size": h,
            "kv_size": h_kv,
            "intermediate_size": intermediate,
        },
        "per_rank_bytes": dict(held, embeddings=embeddings, maxsim_scores=scores),
        "activations_bytes": act,
        "recipe_mode": recipe_mode,
        "total_per_rank_bytes": {mode: static + value for mode, value in act.items()},
    }


def _has_vision(config) -> bool:
    return any(getattr(config.vlm_config, key, None) is not None for key in ("vision_config", "vision_tower"))


# ------------------------------------------------------------------------------------------------------- report
def dry_run(recipe: dict, recipe_path, num_processes=None, accelerate_config=None, json_path=None) -> dict:
    """Build the recipe's data and model at full size without training, print what each rank will hold and
    (with `json_path`) write it as JSON. Returns the estimate."""
    args = training_arguments(recipe.get("training") or {})
    launch = launch_settings(recipe_path, num_processes, accelerate_config, use_cpu=bool(args.get("use_cpu")))
    data = build_dry_data(recipe.get("data") or {})
    steps = count_steps(data["train_sources"], args, launch["num_processes"])
    lora = recipe.get("lora")
    _, config, info = build_meta_model(recipe.get("model") or {}, lora)
    memory = estimate_memory(info, config, args, launch, data, lora)
    report = {
        "recipe": str(recipe_path),
        "launch": launch,
        "data": {k: v for k, v in data.items() if k != "train_sources"},
        "steps": steps,
        "model": info,
        "memory": memory,
    }
    print(format_report(report))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return report


def _gib(value) -> str:
    return f"{value / GIB:8.2f} GiB"


def format_report(report: dict) -> str:
    launch, data, steps, model, memory = (report[k] for k in ("launch", "data", "steps", "model", "memory"))
    n = launch["num_processes"]
    lines = [f"Dry run of {report['recipe']}: nothing is trained; every figure below is an estimate except counts."]
    how = launch["strategy"].upper() if n > 1 else "a single process"
    lines.append(f"launch: {n} process(es), {how} ({launch['accelerate_config'] or 'no accelerate config'})")
    lines.append("data:")
    for part in data["parts"]:
        if part["kind"] == "stand-in":
            sources = part["sources"]
            lines.append(
                f"  stand-in for {len(sources)} absent part(s), {sum(sources.values()):,} records declared in "
                f"data.expected_sizes (generated on access, images not decoded)"
            )
        else:
            lines.append(f"  on disk: {part['train_records'] + part['held_out']:,} records")
    lines.append(f"  train {data['train_records']:,} records, held out {data['held_out_records']:,}")
    lines.append(
        f"steps: global batch {steps['global_batch']:,} (one source per batch"
        f"{', drop_last' if steps['drop_last'] else ''}) -> "
        f"{steps['batches_per_epoch']:,} batches/epoch, gradient accumulation {steps['gradient_accumulation_steps']}, "
        f"{steps['epochs']} epoch(s) -> {steps['optimizer_steps']:,} optimizer steps"
    )
    published = model.get("published")
    lines.append(
        f"model (meta device, {model['dtype']}): backbone {model['backbone']}: {model['backbone_parameters']:,} "
        f"parameters without the LM head" + (f" (published with head: {published:,})" if published else "")
    )
    lines.append(
        f"  MetaEmbed total {model['parameters']:,} parameters, trainable {model['trainable_parameters']:,} "
        f"({', '.join(model['trainable_dtypes']) or '-'})"
        + (f", LoRA r={model['lora'].get('r')}" if model["lora"] else "")
    )
    assume = memory["assumptions"]
    lines.append(
        f"per rank ({memory['strategy'].upper()} over {n}): query {assume['query_tokens']} tokens x "
        f"{assume['query_rows']} rows, candidate {assume['candidate_tokens']} tokens x {assume['candidate_rows']} rows"
        + (f", GradCache chunks of {assume['gradcache_chunk_rows']}" if assume["gradcache_chunk_rows"] else "")
    )
    for name, value in memory["per_rank_bytes"].items():
        if value:
            lines.append(f"  {name.replace('_', ' '):<28} {_gib(value)}")
    lines.append("  activations:")
    for mode, value in memory["activations_bytes"].items():
        mark = "  <- this recipe" if mode == memory["recipe_mode"] else ""
        lines.append(
            f"    {mode.replace('_', ' '):<40} {_gib(value)}   total {_gib(memory['total_per_rank_bytes'][mode])}{mark}"
        )
    lines.append(
        "formulas: training.dry_run.estimate_memory (per-token activations: what a decoder layer saves for its backward, "
        f"FlashAttention, {assume['activation_bytes_per_token_per_layer']:,} bytes/token/layer); "
        "allocator fragmentation, CUDA context and framework buffers are not included."
    )
    margins = ESTIMATE_MARGINS
    lines.append(
        f"margins: parameters, gradients, AdamW ±{margins['parameters']:.0%}; activations + embeddings + scores "
        f"±{margins['step']:.0%} (checked against measured peaks on CPU by tests/test_training_memory_plan.py)"
    )
    return "\n".join(lines)


__all__ = ["dry_run", "estimate_memory", "build_meta_model", "build_dry_data", "StandInRecords", "count_steps"]
