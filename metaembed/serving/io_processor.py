"""The `metaembed` request plugin of vLLM's server: `/pooling` requests carrying raw items.

Encode (the budget's side and the payload form chosen per request; see `wire`):

    POST /pooling {"model": M, "data": {"role": "query", "num_vectors": 2, "encoding": "base64", "dtype": "float16",
                                        "items": [{"text": ..., "instruction": ..., "image": {"base64": ...}}, ...]}}
    -> {"data": {"role": "query", "num_vectors": 2, "fingerprint": F,
                 "embeddings": {"dtype": "float16", "shape": [N, 2, D], "base64": ...}}}

    ("encoding": "float", the default, answers "embeddings": [[[float] * D] * k] * N; num_vectors defaults to R.)

Score (MaxSim at a budget, as `model.similarity(queries, candidates, budget=(r_q, r_c))`):

    POST /pooling {"model": M, "data": {"queries": [item, ...], "candidates": [item, ...], "budget": [r_q, r_c]}}
    -> {"data": {"budget": [r_q, r_c], "fingerprint": F, "scores": [[float] * Nc] * Nq}}

F is the served weights' fingerprint (`sharded.weights_fingerprint`): clients key resumable jobs with it.

The checkpoint's config names this plugin (`io_processor_plugin`, set by `plugin.backbone_config`), so a server
started on a MetaEmbed checkpoint uses it without a flag. Prompts are built by `requests.build_prompts` from the
checkpoint's own processor, exactly as the offline client builds them.
"""

import base64
import io
import logging
from collections import OrderedDict

import torch
from PIL import Image

from modeling_metaembed.configuration_metaembed import check_role
from modeling_metaembed.processing_metaembed import MetaEmbedProcessor, parse_inputs
from modeling_metaembed.scoring_metaembed import check_budget, maxsim

from .requests import build_prompts
from .sharded import weights_fingerprint
from .vllm_api import IOProcessor, PoolingParams
from .wire import check_format, encode_tensor

ENCODE_KEYS = {"role", "items", "num_vectors", "encoding", "dtype"}
SCORE_KEYS = {"queries", "candidates", "budget"}
logger = logging.getLogger(__name__)
MAX_PENDING = 4096  # requests between pre_process and post_process (what each asked for is kept meanwhile)


def _num_vectors(value, full: int, role: str) -> int:
    if value is None:
        return full
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= full:
        raise ValueError(f"num_vectors={value!r} is outside 1..{full}, the number of {role} vectors")
    return value


def _parse_items(records, what: str) -> tuple:
    """(EncodeItems, instructions) of a list of item records; errors name `what` and the item."""
    if not isinstance(records, list) or not records:
        raise ValueError(f"{what} must be a non-empty list of {{'text', 'image', 'instruction'}} objects")
    raw, instructions = [], []
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{what}: item {position}: expected an object")
        unknown = set(record) - {"index", "text", "image", "instruction"}
        if unknown:
            raise ValueError(f"{what}: item {position}: unknown keys {sorted(unknown)}")
        item = {} if record.get("text") is None else {"text": record["text"]}
        if record.get("image") is not None:
            try:
                item["image"] = Image.open(io.BytesIO(base64.b64decode(record["image"]["base64"], validate=True)))
            except Exception as error:  # noqa: BLE001  the message names the item
                raise ValueError(f"{what}: item {position}: cannot decode its image: {error}") from None
        raw.append(item)
        instructions.append(record.get("instruction"))
    try:
        return parse_inputs(raw), instructions
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


class MetaEmbedIOProcessor(IOProcessor):
    def __init__(self, vllm_config, renderer):
        super().__init__(vllm_config, renderer)
        self.processor = MetaEmbedProcessor.from_pretrained(vllm_config.model_config.model)
        self.config = self.processor.config
        try:
            self.fingerprint = weights_fingerprint(vllm_config.model_config.model)
        except Exception as error:  # noqa: BLE001  e.g. weights outside the Hub cache (--download-dir): serve anyway
            logger.warning("metaembed: no fingerprint of the served weights (%s); answers carry null", error)
            self.fingerprint = None
        # What each request asked for, by request id, from pre_process to post_process (vLLM passes only the id).
        self._pending = OrderedDict()

    def parse_data(self, data) -> dict:
        if not isinstance(data, dict):
            raise ValueError(
                "data must be an object: {'role', 'items', ...} to encode, {'queries', 'candidates', 'budget'} to score"
            )
        if "queries" in data or "candidates" in data:
            unknown = set(data) - SCORE_KEYS
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)} in a score request (expected {sorted(SCORE_KEYS)})")
            queries = _parse_items(data.get("queries"), "queries")
            candidates = _parse_items(data.get("candidates"), "candidates")
            available = (self.config.num_vectors("query"), self.config.num_vectors("candidate"))
            budget = check_budget(data.get("budget"), available, "served model's embeddings")
            return {"score": True, "queries": queries, "candidates": candidates, "budget": list(budget)}
        unknown = set(data) - ENCODE_KEYS
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in an encode request (expected {sorted(ENCODE_KEYS)})")
        role = data.get("role")
        check_role(role)
        encoding, dtype = data.get("encoding", "float"), data.get("dtype", "float32")
        check_format(encoding, dtype)
        items, instructions = _parse_items(data.get("items"), "items")
        num_vectors = _num_vectors(data.get("num_vectors"), self.config.num_vectors(role), role)
        return {
            "score": False,
            "role": role,
            "items": items,
            "instructions": instructions,
            "num_vectors": num_vectors,
            "encoding": encoding,
            "dtype": dtype,
        }

    def pre_process(self, prompt: dict, request_id=None, **kwargs) -> list:
        if prompt["score"]:
            prompts = []
            for what, role in (("queries", "query"), ("candidates", "candidate")):
                items, instructions = prompt[what]
                try:
                    prompts += build_prompts(self.processor, items, role, instructions)
                except ValueError as error:
                    raise ValueError(f"{what}: {error}") from None
            settings = {"score": True, "num_queries": len(prompt["queries"][0]), "budget": prompt["budget"]}
        else:
            prompts = build_prompts(self.processor, prompt["items"], prompt["role"], prompt["instructions"])
            settings = {key: prompt[key] for key in ("score", "role", "num_vectors", "encoding", "dtype")}
        self._pending[request_id] = settings
        while len(self._pending) > MAX_PENDING:  # requests that failed between the two steps
            self._pending.popitem(last=False)
        return prompts

    def merge_pooling_params(self, params=None) -> PoolingParams:
        return PoolingParams(task="token_embed")

    def post_process(self, model_output, request_id=None, **kwargs) -> dict:
        settings = self._pending.pop(request_id, None)
        if settings is None:
            raise RuntimeError(
                f"request {request_id!r}: no settings kept from its pre_process (over {MAX_PENDING} "
                "requests in flight?)"
            )
        vectors = [output.outputs.data.float().cpu() for output in model_output]
        if settings["score"]:
            count = settings["num_queries"]
            queries, candidates = torch.stack(vectors[:count]), torch.stack(vectors[count:])
            scores = maxsim(queries, candidates, budget=tuple(settings["budget"]))
            return {"budget": settings["budget"], "fingerprint": self.fingerprint, "scores": scores.tolist()}
        embeddings = torch.stack(vectors)[:, : settings["num_vectors"]]
        return {
            "role": settings["role"],
            "num_vectors": settings["num_vectors"],
            "fingerprint": self.fingerprint,
            "embeddings": encode_tensor(embeddings, settings["encoding"], settings["dtype"]),
        }
