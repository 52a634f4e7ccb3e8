"""The `metaembed` request plugin of vLLM's server: `/pooling` requests carrying raw items.

    POST /pooling {"model": M, "data": {"role": "query", "items": [{"text": ..., "instruction": ...,
                                        "image": {"base64": ...}}, ...]}}
    -> {"data": {"role": "query", "embeddings": [[[float] * D] * R, ...]}}

The checkpoint's config names this plugin (`io_processor_plugin`, set by `plugin.backbone_config`), so a server
started on a MetaEmbed checkpoint uses it without a flag. Prompts are built by `requests.build_prompts` from the
checkpoint's own processor, exactly as the offline client builds them.
"""

import base64
import io

from PIL import Image
from vllm.plugins.io_processors.interface import IOProcessor
from vllm.pooling_params import PoolingParams

from modeling_metaembed.configuration_metaembed import check_role
from modeling_metaembed.processing_metaembed import MetaEmbedProcessor, parse_inputs

from .requests import build_prompts


class MetaEmbedIOProcessor(IOProcessor):
    def __init__(self, vllm_config, renderer):
        super().__init__(vllm_config, renderer)
        self.processor = MetaEmbedProcessor.from_pretrained(vllm_config.model_config.model)

    def parse_data(self, data) -> dict:
        if not isinstance(data, dict) or not isinstance(data.get("items"), list) or not data["items"]:
            raise ValueError("data must be {'role': 'query'|'candidate', 'items': [{'text', 'image', 'instruction'}]}")
        check_role(data.get("role"))
        raw, instructions = [], []
        for position, record in enumerate(data["items"]):
            if not isinstance(record, dict):
                raise ValueError(f"item {position}: expected an object")
            unknown = set(record) - {"index", "text", "image", "instruction"}
            if unknown:
                raise ValueError(f"item {position}: unknown keys {sorted(unknown)}")
            item = {} if record.get("text") is None else {"text": record["text"]}
            if record.get("image") is not None:
                try:
                    item["image"] = Image.open(io.BytesIO(base64.b64decode(record["image"]["base64"], validate=True)))
                except Exception as error:  # noqa: BLE001  the message names the item
                    raise ValueError(f"item {position}: cannot decode its image: {error}") from None
            raw.append(item)
            instructions.append(record.get("instruction"))
        return {"role": data["role"], "items": parse_inputs(raw), "instructions": instructions}

    def pre_process(self, prompt: dict, request_id=None, **kwargs) -> list:
        return build_prompts(self.processor, prompt["items"], prompt["role"], prompt["instructions"])

    def merge_pooling_params(self, params=None) -> PoolingParams:
        return PoolingParams(task="token_embed")

    def post_process(self, model_output, request_id=None, **kwargs) -> dict:
        embeddings = [output.outputs.data.float().tolist() for output in model_output]
        return {"embeddings": embeddings}
