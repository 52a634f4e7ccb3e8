"""MetaEmbed as a sentence-transformers 6 multi-vector input module (`MultiVectorEncoder`).

This file ships at the root of every checkpoint (remote code), next to the model files, and is named by the
checkpoint's `modules.json`, so that

    MultiVectorEncoder(path_or_id, trust_remote_code=True)

loads the checkpoint as a one-module pipeline, and `to_multi_vector_encoder(model)` wraps an in-memory
`MetaEmbedModel` (same weights, no copy). The model file does not import this one; its `save_pretrained` writes
this file beside it. `encode_query` / `encode_document` give the same vectors as
`model.encode(..., role="query" / "candidate")`; `num_vectors=k` keeps the first k (the retrieval budget);
`similarity` is MaxSim, MetaEmbed's score. Nothing here re-implements sentence-transformers: the module only
maps its task ("query" / "document") to MetaEmbed's role and returns the meta vectors as token embeddings.
"""

try:
    # Inside a try block: transformers' remote-code import check skips it, so loading the model with
    # AutoModel never requires sentence-transformers.
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import InputModule
except ImportError as error:
    raise ImportError(
        "MetaEmbed's sentence-transformers module needs sentence-transformers>=6.2: "
        "pip install 'sentence-transformers>=6.2'"
    ) from error

import torch

from .modeling_metaembed import MetaEmbedModel
from .processing_metaembed import parse_inputs

# sentence-transformers' tasks and MetaEmbed's roles. Without a task (plain `encode`), inputs are candidates,
# as in `MetaEmbedModel.encode`.
TASK_TO_ROLE = {"query": "query", "document": "candidate", None: "candidate"}
# Feature keys that are not backbone inputs (set by the sentence-transformers collator or by this module).
NON_MODEL_KEYS = ("task", "token_embeddings", "prompt_length")


def role_for_task(task) -> str:
    if task not in TASK_TO_ROLE:
        raise ValueError(f"unknown task {task!r}: MetaEmbed takes 'query' or 'document'")
    return TASK_TO_ROLE[task]


class MetaEmbedModule(InputModule):
    """The whole MetaEmbed model as the single module of a `MultiVectorEncoder` pipeline.

    Inputs are what `MetaEmbedModel.encode` takes: texts, PIL images, image paths and {"text", "image"} dicts.
    `budget` = (r_q, r_c) sets how many vectors queries and documents get when a call gives no `num_vectors`
    (evaluators and trainers call `encode` without it); None keeps all (R_q, R_c). It is saved with the module.
    A non-empty sentence-transformers `prompt` replaces the role's default instruction
    (config.default_instructions); sentence-transformers' empty default prompts keep it.
    """

    config_file_name = "sentence_metaembed_config.json"  # config.json is the model's own
    config_keys = ["budget"]  # every other setting lives in the MetaEmbed config.json
    save_in_root = True
    forward_kwargs = {"task", "num_vectors"}

    def __init__(self, model: MetaEmbedModel, budget=None):
        super().__init__()
        self.model = model
        self.budget = budget

    @property
    def budget(self) -> list | None:
        return self._budget

    @budget.setter
    def budget(self, value) -> None:
        if value is not None:
            full = (self.model.config.num_query_vectors, self.model.config.num_candidate_vectors)
            valid = (
                isinstance(value, (list, tuple))
                and len(value) == 2
                and all(
                    isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit for v, limit in zip(value, full)
                )
            )
            if not valid:
                raise ValueError(f"budget must be (r_q, r_c) within (1..{full[0]}, 1..{full[1]}), got {value!r}")
            value = [int(value[0]), int(value[1])]
        self._budget = value

    @property
    def modalities(self) -> list:
        # "message" admits batches that mix texts and images (sentence-transformers calls those "message").
        return ["text", "image", ("image", "text"), "message"]

    @property
    def tokenizer(self):
        return self.model._require_processor().tokenizer

    @property
    def max_seq_length(self) -> int | None:
        return None  # MetaEmbed does not truncate; images are capped by config.max_image_tokens

    def preprocess(self, inputs, prompt: str | None = None, task: str | None = None, **kwargs) -> dict:
        role = role_for_task(task)
        items = parse_inputs(list(inputs))
        features = dict(self.model._require_processor()(items, role=role, instruction=prompt or None))
        features["task"] = task
        return features

    def forward(self, features: dict, task: str | None = None, num_vectors: int | None = None, **kwargs) -> dict:
        role = role_for_task(task if task is not None else features.get("task"))
        model_inputs = {
            key: value
            for key, value in features.items()
            if key not in NON_MODEL_KEYS and isinstance(value, torch.Tensor)
        }
        embeddings = self.model(**model_inputs, role=role).embeddings  # [B, R, D] unit vectors, float32
        if num_vectors is None and self.budget is not None:
            num_vectors = self.budget[0] if role == "query" else self.budget[1]
        if num_vectors is not None:
            full = embeddings.shape[1]
            if not isinstance(num_vectors, int) or isinstance(num_vectors, bool) or not 1 <= num_vectors <= full:
                raise ValueError(f"num_vectors={num_vectors!r} is outside 1..{full}, the number of {role} vectors")
            embeddings = embeddings[:, :num_vectors]
        output = dict(features)  # a new dict: losses may run the same features through the model again
        output["token_embeddings"] = embeddings
        # The scoring mask: every meta vector counts (this replaces the input tokens' attention mask).
        output["attention_mask"] = torch.ones(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)
        return output

    def get_embedding_dimension(self) -> int:
        return self.model.config.output_dim

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token=None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict | None = None,
        backend: str = "torch",
        **kwargs,
    ) -> "MetaEmbedModule":
        if backend != "torch":
            raise ValueError(f"MetaEmbed runs on the torch backend only, got backend={backend!r}")
        hub_kwargs = {
            "token": token,
            "cache_dir": cache_folder,
            "revision": revision,
            "local_files_only": local_files_only,
        }
        if subfolder:
            hub_kwargs["subfolder"] = subfolder
        model = MetaEmbedModel.from_pretrained(model_name_or_path, **hub_kwargs, **(model_kwargs or {}))
        module_config = cls.load_config(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        return cls(model, **module_config)


def to_multi_vector_encoder(model: MetaEmbedModel, **encoder_kwargs):
    """A `MultiVectorEncoder` around an in-memory MetaEmbed model (same weights, no copy)."""
    encoder_kwargs.setdefault("similarity_fn_name", "maxsim")
    return MultiVectorEncoder(modules=[MetaEmbedModule(model)], device=str(model.device), **encoder_kwargs)


__all__ = ["MetaEmbedModule", "to_multi_vector_encoder"]
