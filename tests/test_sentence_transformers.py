"""A MetaEmbed checkpoint is a sentence-transformers 6 MultiVectorEncoder: same vectors, same scores, trainable."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sentence_transformers import MultiVectorEncoder, MultiVectorEncoderTrainer
from sentence_transformers.multi_vector_encoder import MultiVectorEncoderTrainingArguments
from sentence_transformers.multi_vector_encoder.evaluation import MultiVectorInformationRetrievalEvaluator
from transformers import AutoModel

from metaembed_training.loss import MatryoshkaContrastiveLoss
from metaembed_training.multi_vector_encoder import MatryoshkaMultiVectorLoss
from metaembed_training.synthetic import synthetic_records
from modeling_metaembed import MetaEmbedModel, maxsim
from modeling_metaembed.sentence_metaembed import to_multi_vector_encoder
from tests.conftest import random_image


@pytest.fixture(scope="module")
def encoder_and_model(tiny_checkpoint):
    folder = tiny_checkpoint("qwen2_5_vl")
    return MultiVectorEncoder(str(folder), trust_remote_code=True), MetaEmbedModel.from_pretrained(folder)


def mixed_inputs(tmp_path):
    image_path = tmp_path / "photo.png"
    random_image(seed=3).save(image_path)
    return [
        "a red bicycle",
        random_image(seed=1),
        {"text": "a caption", "image": random_image(seed=2)},
        str(image_path),
    ]


def test_checkpoint_holds_the_module_file_and_names_it(tiny_checkpoint):
    folder = tiny_checkpoint("qwen2_5_vl")
    assert (folder / "sentence_metaembed.py").is_file()
    modules = json.loads((folder / "modules.json").read_text())
    assert modules == [{"idx": 0, "name": "0", "path": "", "type": "sentence_metaembed.MetaEmbedModule"}]
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st_config["model_type"] == "MultiVectorEncoder" and st_config["similarity_fn_name"] == "maxsim"


def test_loading_needs_trust_remote_code(tiny_checkpoint):
    with pytest.raises(ValueError, match="trust_remote_code"):
        MultiVectorEncoder(str(tiny_checkpoint("qwen2_5_vl")))


@pytest.mark.parametrize("num_vectors", [None, 1, 3])
def test_encode_query_and_document_match_model_encode(encoder_and_model, tmp_path, num_vectors):
    encoder, model = encoder_and_model
    assert type(encoder[0]).__module__.startswith("transformers_modules")  # the checkpoint's own file
    inputs = mixed_inputs(tmp_path)
    queries = encoder.encode_query(inputs, num_vectors=num_vectors, batch_size=2)
    documents = encoder.encode_document(inputs, num_vectors=num_vectors, batch_size=3)
    expected_q = model.encode(inputs, role="query", num_vectors=num_vectors)
    expected_d = model.encode(inputs, role="candidate", num_vectors=num_vectors)
    assert [q.shape[0] for q in queries] == [num_vectors or model.config.num_query_vectors] * len(inputs)
    assert [d.shape[0] for d in documents] == [num_vectors or model.config.num_candidate_vectors] * len(inputs)
    torch.testing.assert_close(torch.stack(queries), expected_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(documents), expected_d, atol=1e-5, rtol=0)
    # Scores: sentence-transformers' MaxSim over the lists equals ours over the tensors.
    torch.testing.assert_close(
        encoder.similarity(queries, documents), maxsim(expected_q, expected_d), atol=1e-5, rtol=0
    )


def test_prompt_replaces_the_default_instruction(encoder_and_model):
    encoder, model = encoder_and_model
    texts = ["what is a cat"]
    prompted = encoder.encode_query(texts, prompt="Find a picture: ")
    torch.testing.assert_close(prompted[0], model.encode(texts, role="query", instruction="Find a picture: ")[0])
    assert not torch.allclose(prompted[0], encoder.encode_query(texts)[0])


def test_budget_set_on_the_module_applies_without_num_vectors_and_is_saved(tiny_checkpoint, tmp_path):
    encoder = MultiVectorEncoder(str(tiny_checkpoint("qwen2_5_vl")), trust_remote_code=True)
    with pytest.raises(ValueError, match="budget"):
        encoder[0].budget = (5, 1)  # the tiny model has R_q = 4
    encoder[0].budget = (2, 3)
    assert encoder.encode_query(["a"])[0].shape[0] == 2 and encoder.encode_document(["b"])[0].shape[0] == 3
    assert encoder.encode_document(["b"], num_vectors=5)[0].shape[0] == 5  # a per-call value wins
    encoder.save_pretrained(str(tmp_path / "saved"))
    assert MultiVectorEncoder(str(tmp_path / "saved"), trust_remote_code=True)[0].budget == [2, 3]
    with pytest.raises(ValueError, match="num_vectors"):
        encoder.encode_query(["a"], num_vectors=9)


def test_in_memory_model_converts_and_saves_a_loadable_encoder(tiny_checkpoint, tmp_path):
    model = MetaEmbedModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"))
    encoder = to_multi_vector_encoder(model)
    assert encoder[0].model is model  # same weights, no copy
    encoder.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "sentence_metaembed.py").is_file()
    reloaded = MultiVectorEncoder(str(tmp_path / "saved"), trust_remote_code=True)
    torch.testing.assert_close(
        torch.stack(reloaded.encode_document(["x y z"])), model.encode(["x y z"]), atol=1e-6, rtol=0
    )


def test_a_checkpoint_loaded_as_remote_code_and_saved_again_still_loads_in_sentence_transformers(
    tiny_checkpoint, tmp_path
):
    folder = tmp_path / "resaved-source"  # a folder name of its own: transformers caches remote code by it
    shutil.copytree(tiny_checkpoint("qwen2_5_vl"), folder)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    model_file = Path(sys.modules[type(model).__module__].__file__)
    assert "transformers_modules" in model_file.parts  # the checkpoint's own code, not this package's
    # transformers copies only the model file and its imports into its cache: the module file is not among them
    assert not model_file.with_name("sentence_metaembed.py").exists()
    model.save_pretrained(tmp_path / "again")
    for name in ("sentence_metaembed.py", "modules.json", "config_sentence_transformers.json"):
        assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes(), name
    encoder = MultiVectorEncoder(str(tmp_path / "again"), trust_remote_code=True)
    torch.testing.assert_close(
        torch.stack(encoder.encode_document(["x y z"])), model.encode(["x y z"]), atol=1e-6, rtol=0
    )


def _pairs(records):
    return {
        "query": [r["query"]["text"] for r in records],
        "positive": [r["positive"]["text"] for r in records],
        "negative": [r["negatives"][0]["text"] for r in records],
    }


def test_loss_equals_the_training_package_loss(encoder_and_model):
    encoder, model = encoder_and_model
    records = synthetic_records(6, seed=4)
    columns = _pairs(records)
    loss = MatryoshkaMultiVectorLoss(encoder, temperature=0.05)
    features = [
        encoder.preprocess(columns["query"], task="query"),
        encoder.preprocess(columns["positive"], task="document"),
        encoder.preprocess(columns["negative"], task="document"),
    ]
    encoder.eval()
    with torch.no_grad():
        parts = loss(features)
    queries = model.encode(columns["query"], role="query")
    positives, negatives = model.encode(columns["positive"]), model.encode(columns["negative"])
    reference = MatryoshkaContrastiveLoss(model.config.matryoshka_groups, temperature=0.05)
    total, per_group = reference(queries, positives, negatives, torch.arange(6))
    assert set(parts) == {f"loss_{name}" for name in per_group}
    torch.testing.assert_close(sum(parts.values()), total, atol=1e-5, rtol=0)


def test_trainer_trains_with_the_matryoshka_loss_and_the_evaluator_runs(tiny_checkpoint, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint("qwen2_5_vl"), folder)
    encoder = MultiVectorEncoder(str(folder), trust_remote_code=True)
    held_out = synthetic_records(24, seed=1)
    evaluator = MultiVectorInformationRetrievalEvaluator(
        queries={str(i): r["query"]["text"] for i, r in enumerate(held_out)},
        corpus={str(i): r["positive"]["text"] for i, r in enumerate(held_out)},
        relevant_docs={str(i): {str(i)} for i in range(len(held_out))},
        name="heldout",
        show_progress_bar=False,
    )
    before = evaluator(encoder)["heldout_maxsim_accuracy@1"]
    args = MultiVectorEncoderTrainingArguments(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=2,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    trainer = MultiVectorEncoderTrainer(
        model=encoder,
        args=args,
        train_dataset=Dataset.from_dict(_pairs(synthetic_records(64, seed=0))),
        loss=MatryoshkaMultiVectorLoss(encoder),
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss_1x1", "loss_2x4", "loss_4x8"} <= set(logged)  # one entry per Matryoshka group
    after = evaluator(encoder)["heldout_maxsim_accuracy@1"]
    assert after >= before + 0.3 and after >= 0.8, (before, after)
