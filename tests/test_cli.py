"""The `metaembed` command line: outputs equal the Python API's, exit codes and messages a script can rely on."""

import json
import subprocess
import sys

import pytest
import torch

from metaembed.cli import main
from metaembed.retrieval.embeddings_file import load_embeddings
from modeling_metaembed import MetaEmbedModel, maxsim
from tests.conftest import random_image


@pytest.fixture()
def inputs_file(tmp_path):
    random_image(seed=1).save(tmp_path / "cat.png")
    lines = [
        {"id": "doc-a", "text": "a red bicycle leaning on a wall"},
        {"id": "doc-b", "image": "cat.png"},
        {"id": "doc-c", "text": "a caption", "image": "cat.png"},
        {"text": "no id: the line number is the id"},
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_encode_and_score_match_the_python_api(tiny_checkpoint, inputs_file, tmp_path, capsys):
    checkpoint = str(tiny_checkpoint("qwen2_5_vl"))
    queries = tmp_path / "queries.txt"
    queries.write_text("bicycle\n\ncat photo\n")  # blank lines are skipped
    assert main(["encode", checkpoint, str(inputs_file), str(tmp_path / "docs.safetensors"), "--quiet"]) == 0
    assert (
        main(
            [
                "encode",
                checkpoint,
                str(queries),
                str(tmp_path / "q.safetensors"),
                "--role",
                "query",
                "--num-vectors",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    docs, doc_ids, meta = load_embeddings(tmp_path / "docs.safetensors")
    assert doc_ids == ["doc-a", "doc-b", "doc-c", "4"] and meta["role"] == "candidate"
    model = MetaEmbedModel.from_pretrained(checkpoint)
    image = tmp_path / "cat.png"
    expected = model.encode(
        [
            "a red bicycle leaning on a wall",
            image,
            {"text": "a caption", "image": image},
            "no id: the line number is the id",
        ]
    )
    torch.testing.assert_close(docs, expected, atol=1e-6, rtol=0)
    q, q_ids, _ = load_embeddings(tmp_path / "q.safetensors")
    assert q_ids == ["1", "3"] and q.shape[1] == 2

    capsys.readouterr()
    assert (
        main(
            [
                "score",
                str(tmp_path / "q.safetensors"),
                str(tmp_path / "docs.safetensors"),
                "--budget",
                "2",
                "4",
                "--top-k",
                "3",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    scores = maxsim(q, docs, budget=(2, 4))
    for row, line in enumerate(lines):
        assert line["query_id"] == q_ids[row] and len(line["results"]) == 3
        best = scores[row].argsort(descending=True)[:3]
        assert [hit["id"] for hit in line["results"]] == [doc_ids[i] for i in best]
        assert line["results"][0]["score"] == pytest.approx(float(scores[row, best[0]]), abs=1e-5)


def test_bad_input_exits_2_with_a_message_naming_the_item(tiny_checkpoint, tmp_path, capsys):
    checkpoint = str(tiny_checkpoint("qwen2_5_vl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert main(["encode", checkpoint, str(bad), str(tmp_path / "out.safetensors")]) == 2
    assert "bad.jsonl:2: unknown keys ['txt']" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    missing_image = tmp_path / "missing.jsonl"
    missing_image.write_text('{"image": "nowhere.png"}\n')
    assert main(["encode", checkpoint, str(missing_image), str(tmp_path / "out.safetensors")]) == 2
    assert "missing.jsonl:1: no image file" in capsys.readouterr().err

    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\n")
    main(["encode", checkpoint, str(texts), str(tmp_path / "c.safetensors"), "--quiet"])
    capsys.readouterr()
    # candidates where queries are expected; a budget over what is stored; a file that is not ours
    assert main(["score", str(tmp_path / "c.safetensors"), str(tmp_path / "c.safetensors")]) == 2
    assert "--role query" in capsys.readouterr().err
    main(["encode", checkpoint, str(texts), str(tmp_path / "q.safetensors"), "--role", "query", "--quiet"])
    assert main(["score", str(tmp_path / "q.safetensors"), str(tmp_path / "c.safetensors"), "--budget", "1", "99"]) == 2
    assert "r_c=99" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "q.safetensors"), str(tmp_path / "c.safetensors"), "--top-k", "0"]) == 2
    assert "--top-k must be a positive integer, got 0" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 32)
    assert main(["score", str(tmp_path / "q.safetensors"), str(tmp_path / "junk.safetensors")]) == 2
    assert "junk.safetensors: cannot read embeddings" in capsys.readouterr().err


def test_publish_dry_run_and_card_from_the_command_line(tiny_checkpoint, tmp_path, capsys):
    import shutil

    checkpoint = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint("qwen2_5_vl"), checkpoint)
    assert main(["card", str(checkpoint), "--repo-id", "org/tiny", "--license", "apache-2.0"]) == 0
    assert "license: apache-2.0" in (checkpoint / "README.md").read_text()
    assert main(["publish", str(checkpoint), "--repo-id", "org/tiny", "--dry-run", str(tmp_path / "up")]) == 0
    assert "dry run" in capsys.readouterr().err and (tmp_path / "up" / "sentence_metaembed.py").is_file()
    assert main(["publish", str(checkpoint), "--repo-id", "org/tiny", "--dry-run", str(tmp_path / "up")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_index_and_search_commands_match_the_python_index(tiny_checkpoint, inputs_file, tmp_path, capsys):
    from metaembed.retrieval.index import MetaEmbedIndex

    checkpoint = str(tiny_checkpoint("qwen2_5_vl"))
    queries = tmp_path / "queries.txt"
    queries.write_text("bicycle\ncat photo\n")
    index_dir = tmp_path / "docs.index"
    assert (
        main(["index", str(inputs_file), str(index_dir), "--model", checkpoint, "--precision", "float32", "--quiet"])
        == 0
    )
    index = MetaEmbedIndex.load(index_dir)
    assert index.ids == ["doc-a", "doc-b", "doc-c", "4"] and index.dtype_name == "float32"
    assert (
        main(["encode", checkpoint, str(queries), str(tmp_path / "q.safetensors"), "--role", "query", "--quiet"]) == 0
    )
    q, q_ids, _ = load_embeddings(tmp_path / "q.safetensors")

    capsys.readouterr()
    assert (
        main(
            ["search", str(index_dir), str(tmp_path / "q.safetensors"), "--budget", "2", "4", "--top-k", "2", "--mmap"]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = index.search(q, budget=(2, 4), k=2)
    assert [line["query_id"] for line in lines] == q_ids
    assert [[hit["id"] for hit in line["results"]] for line in lines] == expected.ids
    # Queries encoded by the command itself give the same hits.
    assert (
        main(
            [
                "search",
                str(index_dir),
                str(queries),
                "--model",
                checkpoint,
                "--budget",
                "2",
                "4",
                "--top-k",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert [
        [hit["id"] for hit in json.loads(line)["results"]] for line in capsys.readouterr().out.splitlines()
    ] == expected.ids

    # An existing index is not overwritten without --append; appending keeps the old items; a duplicate id fails
    # and leaves the saved index as it was.
    more = tmp_path / "more.txt"
    more.write_text("a late addition\n")
    assert main(["index", str(more), str(index_dir), "--model", checkpoint, "--quiet"]) == 2
    assert "--append" in capsys.readouterr().err
    assert main(["index", str(more), str(index_dir), "--model", checkpoint, "--append", "--quiet"]) == 0
    assert MetaEmbedIndex.load(index_dir).ids == ["doc-a", "doc-b", "doc-c", "4", "1"]
    assert main(["index", str(more), str(index_dir), "--model", checkpoint, "--append", "--quiet"]) == 2
    assert "id '1' (position 0) is already in the index" in capsys.readouterr().err
    assert len(MetaEmbedIndex.load(index_dir)) == 5
    # --append keeps the index's dtype: another one given is refused, not silently ignored
    assert main(["index", str(more), str(index_dir), "--model", checkpoint, "--append", "--precision", "int8"]) == 2
    assert "holds precision float32; --append keeps it, got --precision int8" in capsys.readouterr().err


def test_search_names_bad_input(tiny_checkpoint, inputs_file, tmp_path, capsys):
    checkpoint = str(tiny_checkpoint("qwen2_5_vl"))
    index_dir = tmp_path / "docs.index"
    assert main(["index", str(inputs_file), str(index_dir), "--model", checkpoint, "--quiet"]) == 0
    assert main(["encode", checkpoint, str(inputs_file), str(tmp_path / "d.safetensors"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(index_dir), str(tmp_path / "d.safetensors")]) == 2
    assert "holds candidate embeddings, expected query embeddings" in capsys.readouterr().err
    (tensors,) = index_dir.glob("segment-*/vectors.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-8])
    assert main(["search", str(index_dir), str(tmp_path / "d.safetensors")]) == 2
    assert "checksum" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [[], ["encode"], ["score"], ["publish"], ["convert"], ["card"], ["index"], ["search"], ["evaluate"]]
)
def test_help_everywhere_and_usage_errors_exit_2(command):
    run = [sys.executable, "-m", "metaembed", *command]
    assert subprocess.run([*run, "--help"], capture_output=True, text=True).returncode == 0
    usage = subprocess.run(run + (["--no-such-flag"] if command else []), capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: metaembed" in usage.stderr
