"""The evaluation harness: metrics, MMEB and ViDoRe read from local fixtures in the public schemas and checked
against an independent per-row computation, reports, the `metaembed evaluate` command, and the mteb adapter."""

import json
import math
import random

import pytest
import torch

from metaembed.cli import main
from metaembed.evals import mmeb, vidore, write_report
from metaembed.evals.metrics import ndcg_at_k, precision_at_1, recall_at_k
from modeling_metaembed.scoring_metaembed import maxsim
from tests.eval_fixtures import make_mmeb, make_vidore_v1, make_vidore_v2

BUDGETS = [(1, 1), (2, 4), (4, 8)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    return {"mmeb": make_mmeb(root / "mmeb"), "v1": make_vidore_v1(root / "v1"), "v2": make_vidore_v2(root / "v2")}


# ------------------------------------------------------------------------------------------------ metrics
def test_precision_at_1_counts_a_tie_as_a_miss_and_ignores_copies_of_the_positive():
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.5, 0.1], [0.7, 0.7, 0.1], [0.2, 0.3, 0.1]])
    alike = torch.tensor([[True, False, False], [True, False, False], [True, True, False], [True, False, False]])
    assert precision_at_1(scores, alike).tolist() == [True, False, True, False]
    assert precision_at_1(scores).tolist() == [True, False, False, False]


def test_ndcg_matches_trec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")  # installed with mteb: the implementation mteb reports
    rng = random.Random(0)
    for trial in range(20):
        docs = [f"d{i}" for i in range(12)]
        relevance = {d: rng.choice([1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 4))}
        run = {d: 1.0 - i / 100 for i, d in enumerate(rng.sample(docs, len(docs)))}  # distinct scores
        ranking = sorted(run, key=run.get, reverse=True)
        evaluator = pytrec_eval.RelevanceEvaluator({"q": relevance}, {"ndcg_cut.5", "recall.5"})
        expected = evaluator.evaluate({"q": run})["q"]
        assert ndcg_at_k(ranking, relevance, 5) == pytest.approx(expected["ndcg_cut_5"], abs=1e-9)
        assert recall_at_k(ranking, relevance, 5) == pytest.approx(expected["recall_5"], abs=1e-9)
    assert ndcg_at_k(["a", "b"], {"b": 1}, 5) == pytest.approx(1 / math.log2(3))


# ------------------------------------------------------------------------------------------------ MMEB
def _reference_precision(model, queries, candidates, budget) -> float:
    """Per row, encode the query and its candidates directly and check the positive beats every candidate that is
    not a copy of it: no dedup, no grouping."""
    hits = 0
    for query, row in zip(queries, candidates):
        q = model.encode([query], role="query", show_progress_bar=False)
        c = model.encode(row, role="candidate", show_progress_bar=False)
        scores = maxsim(q, c, budget=budget)[0]
        others = [score for score, item in zip(scores[1:], row[1:]) if item != row[0]]
        hits += bool(scores[0] > max(others))
    return 100.0 * hits / len(queries)


def test_mmeb_precision_at_1_equals_a_per_row_computation(tiny_model, data):
    model = tiny_model("qwen2_5_vl")
    results = mmeb.evaluate(
        model,
        tasks=["ImageNet-1K", "MSCOCO_t2i", "RefCOCO"],
        source=data["mmeb"],
        budgets=BUDGETS,
        show_progress_bar=False,
    )
    for task in ("ImageNet-1K", "MSCOCO_t2i", "RefCOCO"):
        queries, candidates = mmeb.load_task(task, data["mmeb"])
        for budget in BUDGETS:
            expected = _reference_precision(model, queries, candidates, budget)
            assert results["tasks"][task]["scores"][f"({budget[0]},{budget[1]})"] == pytest.approx(expected, abs=1e-6)
    tasks = results["tasks"]
    assert [tasks[t]["num_queries"] for t in tasks] == [6, 5, 4]
    for label, averages in results["averages"].items():
        scores = {t: tasks[t]["scores"][label] for t in tasks}
        assert averages["Classification"] == scores["ImageNet-1K"]
        assert averages["IND"] == pytest.approx((scores["ImageNet-1K"] + scores["MSCOCO_t2i"]) / 2)
        assert averages["OOD"] == scores["RefCOCO"]
        assert averages["Overall"] == pytest.approx(sum(scores.values()) / 3)
    table = mmeb.markdown(results)
    header = "| budget | Classification (1) | Retrieval (1) | Grounding (1) | IND (2) | OOD (1) | Overall (3) |"
    assert table.splitlines()[0] == header
    assert [line.split(" | ")[0] for line in table.splitlines()[2:5]] == ["| (1,1)", "| (2,4)", "| (4,8)"]


def test_mmeb_reads_the_schema_as_published(data):
    queries, candidates = mmeb.load_task("MSCOCO_t2i", data["mmeb"], limit=2)
    assert queries == [
        "Find me an everyday image that matches the given caption: picture 0",
        "Find me an everyday image that matches the given caption: picture 1",
    ]
    assert candidates[1][0] == {"text": "Represent the given image.", "image": data["mmeb"] / "images/MSCOCO_t2i/1.jpg"}
    queries, candidates = mmeb.load_task("ImageNet-1K", data["mmeb"])
    assert queries[0] == {
        "text": "Represent the given image for classification",
        "image": data["mmeb"] / "images/ImageNet-1K/0.jpg",
    }
    assert candidates[0] == ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]


def test_mmeb_bad_input_is_named(tiny_model, data, tmp_path):
    model = tiny_model("qwen2_5_vl")
    with pytest.raises(ValueError, match="unknown MMEB task 'ImageNet'"):
        mmeb.load_task("ImageNet", data["mmeb"])
    with pytest.raises(FileNotFoundError, match="ImageNet-1K row 0 \\(query\\): image 'ImageNet-1K/0.jpg'"):
        mmeb.load_task("ImageNet-1K", data["mmeb"], image_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no VOC2007/ folder"):
        mmeb.load_task("VOC2007", data["mmeb"])
    with pytest.raises(ValueError, match="r_c=64 is outside 1..8: the model.s outputs hold 8"):
        mmeb.evaluate(model, tasks=["RefCOCO"], source=data["mmeb"], budgets=[(1, 64)])


# ------------------------------------------------------------------------------------------------ ViDoRe
def test_vidore_v1_queries_and_relevance_follow_the_benchmark(data):
    texts, query_ids, images, pages, qrels = vidore.load_dataset(data["v1"])
    assert texts == ["what is the total?", "who signed the letter?", "when was it issued?", "which table lists costs?"]
    assert pages == [f"page_{i}.png" for i in range(7)] and len(images) == 7
    assert qrels["what is the total?"] == {"page_3.png": 1}  # a repeated query: its last row decides


def test_vidore_v2_reads_beir_with_graded_relevance_and_languages(data):
    texts, query_ids, images, pages, qrels = vidore.load_dataset(data["v2"])
    assert query_ids == [0, 1, 2, 3]  # query 4 has no judged page
    assert qrels[0] == {1: 2, 4: 1}
    texts, query_ids, *_ = vidore.load_dataset(data["v2"], language="french")
    assert texts == ["émissions de 2022"]
    with pytest.raises(ValueError, match="no languages"):
        vidore.load_dataset(data["v1"], language="french")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_vidore_ndcg_equals_an_independent_computation(tiny_model, data, version):
    model = tiny_model("qwen2_5_vl")
    results = vidore.evaluate_dataset(
        model, data[version], budgets=BUDGETS, show_progress_bar=False, index_dtype="float32"
    )
    texts, query_ids, images, pages, qrels = vidore.load_dataset(data[version])
    q = torch.cat([model.encode([t], role="query", show_progress_bar=False) for t in texts])
    c = torch.cat([model.encode([image], role="candidate", show_progress_bar=False) for image in images])
    for budget in BUDGETS:
        scores = maxsim(q, c, budget=budget)
        expected = []
        for row, query_id in zip(scores, query_ids):
            ranking = [pages[i] for i in row.argsort(descending=True).tolist()]
            expected.append(ndcg_at_k(ranking, qrels[query_id], 5))
        found = results["scores"][f"({budget[0]},{budget[1]})"]["ndcg@5"]
        assert found == pytest.approx(100 * sum(expected) / len(expected), abs=1e-6)


def test_report_and_evaluate_command(tiny_checkpoint, data, tmp_path, capsys):
    checkpoint = tiny_checkpoint("qwen2_5_vl")
    out = tmp_path / "mmeb"
    code = main(
        [
            "evaluate",
            "mmeb",
            str(checkpoint),
            "--data",
            str(data["mmeb"]),
            "--tasks",
            "RefCOCO",
            "MSCOCO_t2i",
            "--budgets",
            "1",
            "1",
            "4",
            "8",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["budgets"] == [[1, 1], [4, 8]] and set(results["tasks"]) == {"RefCOCO", "MSCOCO_t2i"}
    assert (out / "results.md").read_text() == capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]  # no temporary files left

    out = tmp_path / "vidore"
    code = main(
        [
            "evaluate",
            "vidore",
            str(checkpoint),
            "--tasks",
            str(data["v1"]),
            str(data["v2"]),
            "--budgets",
            "2",
            "4",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["averages"]) == ["(2,4)"] and len(results["datasets"]) == 2

    assert (
        main(
            [
                "evaluate",
                "mmeb",
                str(checkpoint),
                "--data",
                str(data["mmeb"]),
                "--tasks",
                "Nope",
                "--output",
                str(tmp_path / "x"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "unknown MMEB tasks ['Nope']" in capsys.readouterr().err
    assert main(["evaluate", "vidore", str(checkpoint), "--budgets", "1", "--output", str(tmp_path / "x")]) == 2
    assert "pairs" in capsys.readouterr().err


def test_write_report_replaces_files_whole(tmp_path):
    write_report({"a": 1}, "old\n", tmp_path)
    write_report({"a": 2}, "new\n", tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 2}
    assert (tmp_path / "results.md").read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


# ------------------------------------------------------------------------------------------------ mteb
def test_mteb_evaluates_at_the_chosen_budget(tiny_model):
    mteb = pytest.importorskip("mteb")  # a declared test dependency: this only guards odd environments
    from mteb.mocks.mock_tasks import MockAny2AnyRetrievalT2ITask

    from metaembed.evals.mteb import mteb_model

    model = tiny_model("qwen2_5_vl")
    wrapper = mteb_model(model, (2, 4))
    seen = []
    original = wrapper.model.similarity

    def recording_similarity(queries, documents, **kwargs):
        seen.append(({len(q) for q in queries}, {len(d) for d in documents}))
        return original(queries, documents, **kwargs)

    wrapper.model.similarity = recording_similarity
    assert wrapper.mteb_model_meta.model_name_with_experiment.endswith("(budget=2x4)")
    result = mteb.evaluate(wrapper, [MockAny2AnyRetrievalT2ITask()], cache=None, show_progress_bar=False)
    assert seen and all(shapes == ({2}, {4}) for shapes in seen)  # queries scored with 2 vectors, images with 4
    score = result.task_results[0].get_score()
    assert 0.0 <= score <= 1.0
    with pytest.raises(ValueError, match="budget"):
        mteb_model(model, (9, 4))
