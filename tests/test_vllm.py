"""vLLM serves MetaEmbed checkpoints with `model.encode`'s embeddings (<= 1e-4, float32, CPU).

vLLM pins its own torch, so it runs in its own environment (.venv-vllm, built by ./run): these tests drive it through
subprocesses (tests/vllm_worker.py for the offline engine, vLLM's OpenAI-compatible server on loopback) and compare
with this environment's `model.encode`. A missing vLLM environment fails the tests: it is not a reason to skip them.
"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import random_image

from metaembed.cli import main
from metaembed.retrieval.embeddings_file import load_embeddings
from metaembed.retrieval.index import MetaEmbedIndex
from metaembed.serving.plugin import backbone_config
from modeling_metaembed import MetaEmbedModel
from modeling_metaembed.testing import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("METAEMBED_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
TOLERANCE = 1e-4
# vLLM's CPU attention needs a head size of at least 32: 2 heads of 32 in the tiny 64-wide decoders.
HEADS_OF_32 = {"num_attention_heads": 2, "num_key_value_heads": 1}
QWEN_VL_HEADS_OF_32 = {**HEADS_OF_32, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                          "mrope_section": [4, 6, 6]}}  # fmt: skip
TEXTS = ["a red bicycle leaning on a wall", "what is the capital of France?", "short"]


def vllm_python() -> str:
    if not VLLM_PYTHON.exists():
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}: `./run test` builds .venv-vllm (see docs/serving.md)")
    return str(VLLM_PYTHON)


def vllm_env(folder: Path) -> dict:
    env = dict(os.environ)
    env.update(TMPDIR=str(folder), VLLM_CACHE_ROOT=str(folder / "vllm-cache"), VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))  # fmt: skip
    return env


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-inputs")
    random_image(seed=5).save(folder / "photo.png")  # 90 x 60
    # 84 x 76: over the checkpoint's 8-token cap, and rounded up past it by the Qwen resize: exercises the cap.
    random_image(width=84, height=76, seed=6).save(folder / "capped.png")
    rgba = (np.random.RandomState(7).rand(50, 70, 4) * 255).astype("uint8")
    Image.fromarray(rgba, mode="RGBA").save(folder / "transparent.png")  # composited on white by both sides
    return folder


def mixed(files: Path) -> list:
    return [TEXTS[0], {"image": str(files / "photo.png")}, {"text": "a caption", "image": str(files / "capped.png")},
            TEXTS[1], {"image": str(files / "transparent.png")}]  # fmt: skip


def run_worker(folder: Path, job: dict) -> dict:
    job = {**job, "output": str(folder / "results.pt")}
    (folder / "job.json").write_text(json.dumps(job))
    result = subprocess.run([vllm_python(), str(ROOT / "tests" / "vllm_worker.py"), str(folder / "job.json")],
                            env=vllm_env(folder), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(folder / "results.pt")


def assert_equal_embeddings(got: torch.Tensor, want: torch.Tensor):
    assert got.shape == want.shape and got.dtype == torch.float32
    difference = (got - want).abs().max().item()
    assert difference <= TOLERANCE, f"vLLM differs from model.encode by {difference:.2e}"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-qwen3")
    return make_tiny_checkpoint(folder / "checkpoint", family="qwen3", embedding_dim=32, text_overrides={
        **HEADS_OF_32, "head_dim": 32})  # fmt: skip


@pytest.fixture(scope="module")
def qwen25vl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-qwen2_5_vl")
    return make_tiny_checkpoint(folder / "checkpoint", family="qwen2_5_vl", embedding_dim=48, max_image_tokens=8,
                                text_overrides=QWEN_VL_HEADS_OF_32)  # fmt: skip


def test_qwen3_offline_engine_equals_encode(qwen3, files, tmp_path):
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(TEXTS) + "\n")
    instructions = ["Represent the page: ", None, "Find: "]
    calls = [
        {"name": "queries", "inputs": TEXTS, "role": "query"},
        {"name": "candidates", "inputs": TEXTS, "role": "candidate", "instruction": "Represent: "},
        {"name": "per_item_instructions", "inputs": TEXTS, "role": "query", "instruction": instructions},
        {"name": "prefix", "inputs": TEXTS[:2], "role": "candidate", "num_vectors": 3},
    ]
    cli = [["encode", str(qwen3), str(texts_file), str(tmp_path / "vllm.safetensors"), "--engine", "vllm",
            "--role", "query", "--quiet"]]  # fmt: skip
    bad = {"empty_text": ["fine", "   "], "image_for_text_model": [{"image": str(files / "photo.png")}]}
    job = {"checkpoint": str(qwen3), "calls": calls, "cli": cli, "bad_inputs": bad,
           "index": {"inputs": TEXTS, "num_vectors": 4}}  # fmt: skip
    out = run_worker(tmp_path, job)

    model = MetaEmbedModel.from_pretrained(qwen3)
    for call in calls:
        want = model.encode(call["inputs"], role=call["role"], instruction=call.get("instruction"),
                            num_vectors=call.get("num_vectors"))  # fmt: skip
        assert_equal_embeddings(out["results"][call["name"]], want)
    assert out["results"]["prefix"].shape == (2, 3, 32)
    # MetaEmbedIndex.add_items takes the vLLM encoder where it takes a model.
    index = MetaEmbedIndex(dim=32, num_vectors=4, dtype="float32")
    index.add_items(model, TEXTS, show_progress_bar=False)
    assert_equal_embeddings(out["results"]["index_vectors"], index.vectors)
    # The same validation as model.encode, naming the item.
    assert out["errors"]["empty_text"] == "item 1: text is empty or whitespace-only"
    assert "item 0: has an image but this MetaEmbed backbone (qwen3) is text-only" in out["errors"][
        "image_for_text_model"]
    # `metaembed encode --engine vllm` writes the file `metaembed encode` writes (ids, role, model, embeddings).
    assert out["cli_codes"] == [0]
    assert main(["encode", str(qwen3), str(texts_file), str(tmp_path / "hf.safetensors"), "--role", "query",
                 "--quiet"]) == 0  # fmt: skip
    got, got_ids, got_meta = load_embeddings(tmp_path / "vllm.safetensors")
    want, want_ids, want_meta = load_embeddings(tmp_path / "hf.safetensors")
    assert got_ids == want_ids == ["1", "2", "3"] and got_meta == want_meta
    assert_equal_embeddings(got, want)


def test_qwen2_5_vl_offline_engine_with_images_equals_encode(qwen25vl, files, tmp_path):
    inputs = mixed(files)
    calls = [
        {"name": "queries", "inputs": inputs, "role": "query"},
        {"name": "candidates", "inputs": inputs, "role": "candidate",
         "instruction": ["Represent: ", None, "Describe: ", None, "Picture: "]},
        {"name": "prefix", "inputs": inputs, "role": "candidate", "num_vectors": 3},
        {"name": "images_only", "inputs": inputs[1:3] + inputs[4:], "role": "candidate"},
    ]  # fmt: skip
    out = run_worker(tmp_path, {"checkpoint": str(qwen25vl), "calls": calls})
    model = MetaEmbedModel.from_pretrained(qwen25vl)
    for call in calls:
        want = model.encode(call["inputs"], role=call["role"], instruction=call.get("instruction"),
                            num_vectors=call.get("num_vectors"))  # fmt: skip
        assert_equal_embeddings(out["results"][call["name"]], want)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_other_qwen_vl_backbones_with_images_equal_encode(family, files, tmp_path):
    rope = {**QWEN_VL_HEADS_OF_32["rope_parameters"], **({"mrope_interleaved": True} if family == "qwen3_vl" else {})}
    sizes = {**QWEN_VL_HEADS_OF_32, "rope_parameters": rope, **({"head_dim": 32} if family == "qwen3_vl" else {})}
    checkpoint = make_tiny_checkpoint(tmp_path / "checkpoint", family=family, embedding_dim=48, max_image_tokens=8,
                                      text_overrides=sizes)  # fmt: skip
    inputs = mixed(files)
    calls = [{"name": "queries", "inputs": inputs, "role": "query"},
             {"name": "candidates", "inputs": inputs, "role": "candidate", "instruction": "Represent: "}]  # fmt: skip
    out = run_worker(tmp_path, {"checkpoint": str(checkpoint), "calls": calls})
    model = MetaEmbedModel.from_pretrained(checkpoint)
    for call in calls:
        want = model.encode(call["inputs"], role=call["role"], instruction=call.get("instruction"))
        assert_equal_embeddings(out["results"][call["name"]], want)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(qwen25vl, tmp_path_factory):
    """vLLM's OpenAI-compatible server on loopback, serving the tiny Qwen2.5-VL MetaEmbed checkpoint."""
    folder = tmp_path_factory.mktemp("vllm-server")
    port = _free_port()
    command = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(qwen25vl),
               "--runner", "pooling", "--pooler-config", '{"task": "token_embed"}', "--dtype", "float32",
               "--max-model-len", "512", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(command, env=vllm_env(folder), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                log_text = (folder / "server.log").read_text()[-4000:]
                pytest.fail(f"the vLLM server exited ({process.returncode}):\n{log_text}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the vLLM server did not start in 600 s")
                time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the engine processes it spawned
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_server_over_http_equals_encode(server, qwen25vl, files, tmp_path):
    from metaembed.serving.client import ServerEncoder

    encoder = ServerEncoder(server, qwen25vl, max_items_per_request=2)  # several requests per call
    model = MetaEmbedModel.from_pretrained(qwen25vl)
    inputs = mixed(files)
    for role, options in (("query", {}), ("candidate", {"instruction": "Represent: "}),
                          ("candidate", {"num_vectors": 2})):  # fmt: skip
        want = model.encode(inputs, role=role, **options)
        assert_equal_embeddings(encoder.encode(inputs, role=role, **options), want)

    # `metaembed encode --server URL` (this environment, no vLLM here) writes what `metaembed encode` writes.
    lines = [{"id": f"doc-{i}", **({"text": x} if isinstance(x, str) else x)} for i, x in enumerate(inputs)]
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert main(["encode", str(qwen25vl), str(source), str(tmp_path / "server.safetensors"), "--server", server,
                 "--quiet"]) == 0  # fmt: skip
    assert main(["encode", str(qwen25vl), str(source), str(tmp_path / "hf.safetensors"), "--quiet"]) == 0
    got, got_ids, _ = load_embeddings(tmp_path / "server.safetensors")
    want, want_ids, _ = load_embeddings(tmp_path / "hf.safetensors")
    assert got_ids == want_ids
    assert_equal_embeddings(got, want)


def test_server_rejects_a_bad_item_naming_it(server, qwen25vl):
    body = {"model": str(qwen25vl), "data": {"role": "query", "items": [{"text": "ok"}, {"text": " "}]}}
    request = urllib.request.Request(server + "/pooling", headers={"Content-Type": "application/json"},
                                     data=json.dumps(body).encode())  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 400 and "item 1: text is empty" in raised.value.read().decode()


@pytest.mark.parametrize("family", ["bert", "paligemma", "mllama", "litevl"])
def test_families_vllm_cannot_serve_are_refused_with_the_reason(tiny_checkpoint, family):
    config = json.loads((Path(tiny_checkpoint(family)) / "config.json").read_text())
    with pytest.raises(ValueError, match=f"on a {family} backbone cannot be served by vLLM: .+ model.encode"):
        backbone_config(config)


def test_a_served_config_reads_as_its_backbone_config(qwen25vl):
    config = backbone_config(json.loads((Path(qwen25vl) / "config.json").read_text()))
    assert type(config).__name__ == "Qwen2_5_VLConfig" and config.architectures == ["MetaEmbedQwen2_5_VL"]
    assert config.metaembed["embedding_dim"] == 48 and config.metaembed["max_image_tokens"] == 8
    assert len(config.metaembed["query_meta_token_ids"]) == 4 and config.io_processor_plugin == "metaembed"
