"""The paper's Table 5 baselines as pooling modes of the same model class: last token, mean, split segments."""

import pytest
import torch
from transformers import AutoModel

from metaembed_training.data import ContrastiveDataset
from metaembed_training.synthetic import synthetic_records
from metaembed_training.trainer import MetaEmbedTrainer, MetaEmbedTrainingArguments
from modeling_metaembed import MetaEmbedConfig
from tests.conftest import random_image

TEXTS = ["a short one", "a somewhat longer sentence with many more words in it than the first", "x"]


def states_and_mask(model, texts, role):
    batch = model.processor(texts, role=role)
    out = model(**batch, role=role, output_hidden_states=True)
    return out, batch["attention_mask"].bool()


@pytest.mark.parametrize("family", ["qwen3", "qwen2_5_vl"])
def test_last_token_and_mean_pooling_read_the_content(tiny_checkpoint, family):
    for pooling in ("last_token", "mean"):
        path = tiny_checkpoint(family, pooling=pooling, num_query_vectors=1, num_candidate_vectors=1)
        model = AutoModel.from_pretrained(path, trust_remote_code=True)
        assert model.config.pooling == pooling
        out, mask = states_and_mask(model, TEXTS, "query")
        meta_ids = set(model.config.query_meta_token_ids + model.config.candidate_meta_token_ids)
        assert not (set(model.processor(TEXTS, role="query")["input_ids"].flatten().tolist()) & meta_ids)
        for row in range(len(TEXTS)):
            real = out.last_hidden_state[row][mask[row]]
            expected = real[-1] if pooling == "last_token" else real.mean(dim=0)
            torch.testing.assert_close(out.embeddings[row, 0], torch.nn.functional.normalize(expected, dim=-1))
        # Batch composition and padding do not change an input's vector.
        alone = model.encode_queries([TEXTS[0]])
        torch.testing.assert_close(model.encode_queries(TEXTS)[0], alone[0], atol=1e-5, rtol=1e-5)


def test_segment_mean_cuts_real_tokens_into_contiguous_segments(tiny_checkpoint):
    model = AutoModel.from_pretrained(tiny_checkpoint("qwen3", pooling="segment_mean"), trust_remote_code=True)
    out, mask = states_and_mask(model, TEXTS, "candidate")
    k = model.config.num_candidate_vectors
    assert out.embeddings.shape[1] == k
    for row in range(len(TEXTS)):
        real = out.last_hidden_state[row][mask[row]]
        n = real.shape[0]
        for j in range(k):
            start = j * n // k
            end = max((j + 1) * n // k, start + 1)  # short inputs: segments overlap rather than go empty
            expected = torch.nn.functional.normalize(real[start:end].mean(dim=0), dim=-1)
            torch.testing.assert_close(out.embeddings[row, j], expected, atol=1e-5, rtol=1e-5)
    mixed = model.encode_candidates(["words", random_image(seed=1)] if model.processor.has_vision else ["words"])
    assert torch.isfinite(mixed).all()


def test_pooling_baselines_train(tiny_checkpoint, tmp_path):
    model = AutoModel.from_pretrained(
        tiny_checkpoint("qwen3", pooling="mean", num_query_vectors=1, num_candidate_vectors=1), trust_remote_code=True
    )
    args = MetaEmbedTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = MetaEmbedTrainer(model=model, args=args, train_dataset=ContrastiveDataset(synthetic_records(16)))
    trainer.train()
    assert trainer.loss_fn.groups == [(1, 1)]


def test_bad_pooling_settings_are_named():
    with pytest.raises(ValueError, match="pooling must be one of"):
        MetaEmbedConfig(pooling="max")
    with pytest.raises(ValueError, match="one vector per input: set num_query_vectors"):
        MetaEmbedConfig(pooling="last_token")
