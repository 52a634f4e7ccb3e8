"""Think-Then-Embed: reasoners (a generative checkpoint, a callable, the embedder's own backbone), the trace cache,
conditioning at inference and in training, and bad input."""

import json
import warnings

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from metaembed_training.data import ContrastiveDataset, MetaEmbedCollator, RecordError
from metaembed_training.reasoning import add_reasoning
from metaembed_training.reasoning import main as reasoning_main
from modeling_metaembed import MetaEmbedModel
from modeling_metaembed.reasoning_metaembed import GenerativeReasoner, TraceCache, content_key, generate_traces
from modeling_metaembed.testing import make_tiny_backbone
from tests.conftest import random_image


class CountingReasoner:
    """A deterministic callable reasoner that counts the items it is asked about."""

    identity = "counting-reasoner/1"

    def __init__(self):
        self.calls = 0

    def __call__(self, items):
        self.calls += len(items)
        return [f"it is about {item['text'] or 'an image'}; look for its main object" for item in items]


@pytest.fixture(scope="module")
def sharp_backbones(tmp_path_factory):
    """Tiny backbones with their weights scaled up, so that greedy generation depends on the prompt (at the default
    init every prompt gives the same tokens), and MetaEmbed models built from them with their heads kept."""
    built = {}

    def build(family):
        if family not in built:
            folder = tmp_path_factory.mktemp(f"sharp-{family}")
            make_tiny_backbone(folder, family=family)
            auto = AutoModelForImageTextToText if family == "qwen2_5_vl" else AutoModelForCausalLM
            generator = auto.from_pretrained(folder)
            with torch.no_grad():
                for parameter in generator.parameters():
                    if parameter.dim() == 2:
                        parameter.mul_(8)
            generator.save_pretrained(folder)
            model = MetaEmbedModel.from_vlm(folder, num_query_vectors=4, num_candidate_vectors=8, keep_lm_head=True)
            built[family] = (folder, model)
        return built[family]

    return build


# ------------------------------------------------------------------------------------------------ conditioning
def test_a_trace_changes_the_query_embedding_exactly_as_its_text_would(tiny_model):
    model = tiny_model("qwen2_5_vl")
    image = random_image(seed=3)
    queries = ["a dog on a red sofa", {"text": "what is in this chart?", "image": image}]
    traces = ["the sofa is red and a dog lies on it", "a bar chart of yearly sales"]
    plain = model.encode(queries, role="query")
    thought = model.encode(queries, role="query", traces=traces)
    assert (plain - thought).abs().amax(dim=(1, 2)).min() > 1e-3  # every query moved
    template = model.config.reasoning_template
    by_hand = model.encode(
        [
            template.format(text=queries[0], trace=traces[0]),
            {"text": template.format(text=queries[1]["text"], trace=traces[1]), "image": image},
        ],
        role="query",
    )
    torch.testing.assert_close(thought, by_hand, atol=1e-6, rtol=0)
    # A None trace leaves its query alone.
    mixed = model.encode(queries, role="query", traces=[None, traces[1]])
    torch.testing.assert_close(mixed[0], plain[0], atol=1e-6, rtol=0)


def test_candidates_are_not_reasoned_over_unless_configured(tiny_model, tiny_checkpoint):
    model = tiny_model("qwen2_5_vl")
    with pytest.raises(ValueError, match="conditions \\['query'\\] inputs on traces, not candidate"):
        model.encode(["a page"], role="candidate", traces=["a trace"])
    both = MetaEmbedModel.from_pretrained(tiny_checkpoint("qwen2_5_vl", reasoning_roles=("query", "candidate")))
    assert both.config.reasoning_roles == ["query", "candidate"]
    plain, thought = both.encode(["a page"]), both.encode(["a page"], traces=["about a page"])
    assert (plain - thought).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ cache
def test_a_cached_trace_gives_the_same_embedding_as_a_fresh_one(tiny_model, tmp_path):
    model = tiny_model("qwen2_5_vl")
    queries = ["a dog on a red sofa", {"text": "a chart", "image": random_image(seed=4)}, "a dog on a red sofa"]
    first = CountingReasoner()
    fresh = model.encode(queries, role="query", reasoner=first, trace_cache=tmp_path / "traces")
    assert first.calls == 2  # the repeated query is reasoned over once
    second = CountingReasoner()
    cached = model.encode(queries, role="query", reasoner=second, trace_cache=tmp_path / "traces")
    assert second.calls == 0
    torch.testing.assert_close(cached, fresh, atol=0, rtol=0)
    assert len(TraceCache(tmp_path / "traces", CountingReasoner.identity)) == 2


def test_an_interrupted_run_resumes_from_its_cache(tmp_path):
    items = [{"text": f"query {i}", "image": None} for i in range(5)]

    class FailsOnTheSecondBatch(CountingReasoner):
        def __call__(self, batch):
            if self.calls >= 2:
                raise RuntimeError("interrupted")
            return super().__call__(batch)

    with pytest.raises(RuntimeError, match="interrupted"):
        generate_traces(FailsOnTheSecondBatch(), items, cache=tmp_path, batch_size=2)
    resumed = CountingReasoner()
    traces = generate_traces(resumed, items, cache=tmp_path, batch_size=2)
    assert resumed.calls == 3 and traces == CountingReasoner()(items)
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written shard


def test_content_keys_follow_content_not_names(tmp_path):
    image = random_image(seed=5)
    image.save(tmp_path / "a.png")
    image.save(tmp_path / "b.png")
    same_bytes = [content_key({"text": "x", "image": tmp_path / name}) for name in ("a.png", "b.png")]
    assert same_bytes[0] == same_bytes[1]
    assert content_key({"text": "x", "image": None}) != content_key({"text": "x", "image": tmp_path / "a.png"})
    assert content_key({"text": "x", "image": image}) != content_key({"text": "x", "image": random_image(seed=6)})


# ------------------------------------------------------------------------------------------------ generative reasoners
def test_batched_left_padded_generation_equals_one_at_a_time(sharp_backbones):
    folder, _ = sharp_backbones("qwen3")
    items = [{"text": t, "image": None} for t in ["a", "a much longer query about dogs", "cats", "a red car"]]
    batched = GenerativeReasoner.from_pretrained(folder, max_new_tokens=6, batch_size=4)(items)
    single = GenerativeReasoner.from_pretrained(folder, max_new_tokens=6, batch_size=1)(items)
    assert batched == single
    assert len(set(batched)) > 1  # the traces depend on the query


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3"])
def test_the_unified_model_thinks_and_embeds_with_one_set_of_weights(sharp_backbones, family, tmp_path):
    folder, model = sharp_backbones(family)
    reasoner = model.as_reasoner(max_new_tokens=6)
    generator = reasoner.model
    assert getattr(generator, generator.base_model_prefix) is model.vlm  # the same modules, not a copy
    assert generator.get_output_embeddings().weight.data_ptr() == model.lm_head.weight.data_ptr()

    items = [{"text": "a dog on a red sofa", "image": None}, {"text": "a chart of sales", "image": None}]
    if family == "qwen2_5_vl":
        items.append({"text": "what is shown?", "image": random_image(seed=7)})
    separate = GenerativeReasoner.from_pretrained(folder, prompt=model.config.reasoning_prompt, max_new_tokens=6)
    assert reasoner(items) == separate(items)  # the backbone's own head: the original checkpoint's generations
    assert model.processor.tokenizer.padding_side == model.config.padding_side  # the shared tokenizer is put back

    # It survives save/load, and encode(reasoner="self") uses it.
    model.save_pretrained(tmp_path / "saved")
    reloaded = MetaEmbedModel.from_pretrained(tmp_path / "saved")
    assert reloaded.as_reasoner(max_new_tokens=6)(items) == reasoner(items)
    remote = AutoModel.from_pretrained(tmp_path / "saved", trust_remote_code=True)  # the shipped code
    assert remote.as_reasoner(max_new_tokens=6)(items) == reasoner(items)
    texts = [item["text"] for item in items[:2]]
    traces = reasoner(items[:2])
    torch.testing.assert_close(
        reloaded.encode(texts, role="query", reasoner=reloaded.as_reasoner(max_new_tokens=6)),
        reloaded.encode(texts, role="query", traces=traces),
        atol=1e-6,
        rtol=0,
    )
    assert reloaded.encode(texts, role="query", reasoner="self").shape == (2, 4, model.config.output_dim)


def test_meta_tokens_are_never_generated(sharp_backbones):
    _, model = sharp_backbones("qwen3")
    reasoner = model.as_reasoner(max_new_tokens=4)
    meta = set(model.config.query_meta_token_ids + model.config.candidate_meta_token_ids)
    assert set(reasoner.generation["suppress_tokens"]) == meta


def test_a_model_without_a_head_says_how_to_keep_one(tiny_model):
    with pytest.raises(ValueError, match="keep_lm_head=True"):
        tiny_model("qwen2_5_vl").as_reasoner()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_reasoners_and_traces_are_named(tiny_model, tmp_path):
    model = tiny_model("qwen2_5_vl")
    with pytest.raises(ValueError, match="returned 1 traces for 2 items"):
        model.encode(["a", "b"], role="query", reasoner=lambda items: ["only one"])
    with pytest.raises(ValueError, match="empty trace for item 1"):
        model.encode(["a", "b"], role="query", reasoner=lambda items: ["fine", "  "])
    with pytest.raises(ValueError, match="trace for item 0 is a int"):
        model.encode(["a"], role="query", reasoner=lambda items: [3])
    with pytest.raises(ValueError, match="got 1 traces for 2 inputs"):
        model.encode(["a", "b"], role="query", traces=["x"])
    with pytest.raises(ValueError, match="item 0: its trace is empty"):
        model.encode(["a"], role="query", traces=[""])
    with pytest.raises(ValueError, match="a reasoner or traces, not both"):
        model.encode(["a"], role="query", traces=["x"], reasoner=CountingReasoner())
    generate_traces(CountingReasoner(), [{"text": "a", "image": None}], cache=tmp_path / "cache")
    other = lambda items: ["x"] * len(items)  # noqa: E731
    with pytest.raises(ValueError, match="holds traces of reasoner 'counting-reasoner/1'"):
        model.encode(["a"], role="query", reasoner=other, trace_cache=tmp_path / "cache")


def test_a_long_trace_is_cut_with_a_warning_never_dropped(tiny_checkpoint):
    model = MetaEmbedModel.from_pretrained(tiny_checkpoint("qwen2_5_vl", max_trace_tokens=8))
    tokenizer = model.processor.tokenizer
    trace = "the query asks for a very specific arrangement of many objects " * 4
    with pytest.warns(UserWarning, match="item 0: its trace has \\d+ tokens; cut to 8"):
        embedded = model.encode(["a query"], role="query", traces=[trace])
    cut = tokenizer.decode(tokenizer(trace, add_special_tokens=False)["input_ids"][:8], skip_special_tokens=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trace within the budget: no warning
        expected = model.encode(["a query"], role="query", traces=[cut.strip()])
    torch.testing.assert_close(embedded, expected, atol=1e-6, rtol=0)
    assert (embedded - model.encode(["a query"], role="query")).abs().max() > 1e-3  # not dropped


# ------------------------------------------------------------------------------------------------ training
def test_training_records_are_conditioned_like_inference(tiny_model):
    model = tiny_model("qwen2_5_vl")
    records = [
        {"query": {"text": "a dog", "reasoning": "a dog, probably on a sofa"}, "positive": {"text": "dog"}},
        {"query": {"text": "a cat"}, "positive": {"text": "cat"}},
    ]
    batch = MetaEmbedCollator(model.processor)(records)
    inputs = batch["queries"][0]["inputs"]
    expected = model.processor(
        [model.config.reasoning_template.format(text="a dog", trace="a dog, probably on a sofa"), "a cat"], role="query"
    )
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    bad = [{"query": {"text": "q"}, "positive": {"text": "p", "reasoning": "not for candidates"}}]
    with pytest.raises(RecordError, match="positive carries reasoning"):
        MetaEmbedCollator(model.processor)(bad)
    with pytest.raises(RecordError, match="reasoning must be a non-empty string"):
        MetaEmbedCollator(model.processor)([{"query": {"text": "q", "reasoning": ""}, "positive": {"text": "p"}}])


def test_traces_are_generated_ahead_of_training(tmp_path):
    records = [{"id": f"r{i}", "query": {"text": f"query {i}"}, "positive": {"text": f"doc {i}"}} for i in range(3)]
    records[1]["query"]["reasoning"] = "written by hand"
    reasoned = add_reasoning(
        ContrastiveDataset(records), CountingReasoner(), cache=tmp_path / "cache", show_progress_bar=False
    )
    assert [reasoned[i]["query"]["reasoning"] for i in range(3)] == [
        "it is about query 0; look for its main object",
        "written by hand",
        "it is about query 2; look for its main object",
    ]


def test_reasoning_command_and_recipe(sharp_backbones, tmp_path):
    from metaembed_training.train import main as train_main

    folder, model = sharp_backbones("qwen3")
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    (tmp_path / "data").mkdir()
    records = [{"query": {"text": f"find item {i}"}, "positive": {"text": f"item {i}"}} for i in range(4)]
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "reasoned.jsonl"
    assert (
        reasoning_main(
            [
                "--records",
                str(tmp_path / "data" / "train.jsonl"),
                "--output",
                str(out),
                "--checkpoint",
                str(checkpoint),
                "--cache",
                str(tmp_path / "cache"),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    written = [json.loads(line) for line in out.read_text().splitlines()]
    expected = model.as_reasoner(max_new_tokens=4)([{"text": r["query"]["text"], "image": None} for r in records])
    assert [r["query"]["reasoning"] for r in written] == expected

    code = train_main(
        [
            "--config",
            "training/recipes/think-then-embed-tiny.yaml",
            f"training.output_dir={tmp_path}/run",
            f"reasoning.cache={tmp_path}/traces",
            "data.synthetic.count=32",
        ]
    )
    assert code == 0 and (tmp_path / "run" / "final" / "config.json").is_file()
    identity = json.loads((tmp_path / "traces" / "reasoner.json").read_text())["reasoner"]
    assert len(TraceCache(tmp_path / "traces", identity)) == 32


def test_encode_command_with_a_reasoner(sharp_backbones, tmp_path):
    from metaembed.cli import main
    from metaembed.retrieval.embeddings_file import load_embeddings

    _, model = sharp_backbones("qwen3")
    model.save_pretrained(tmp_path / "checkpoint")
    (tmp_path / "queries.txt").write_text("a dog on a red sofa\nthe chart of sales\n")
    arguments = [
        "encode",
        str(tmp_path / "checkpoint"),
        str(tmp_path / "queries.txt"),
        str(tmp_path / "q.safetensors"),
        "--role",
        "query",
        "--reasoner",
        "self",
        "--max-new-tokens",
        "5",
        "--trace-cache",
        str(tmp_path / "tc"),
        "--quiet",
    ]
    assert main(arguments) == 0
    embedded, ids, _ = load_embeddings(tmp_path / "q.safetensors")
    texts = ["a dog on a red sofa", "the chart of sales"]
    traces = model.as_reasoner(max_new_tokens=5)([{"text": t, "image": None} for t in texts])
    torch.testing.assert_close(embedded, model.encode(texts, role="query", traces=traces), atol=1e-5, rtol=0)
    assert len(list((tmp_path / "tc").glob("shard-*.json"))) == 1
