"""What the benchmarks share: a timer, and a random Qwen3-shaped MetaEmbed of a chosen size (R_q = 16, R_c = 64)."""

import statistics
import tempfile
import time

import torch

from modeling_metaembed import MetaEmbedModel
from modeling_metaembed.testing import make_tiny_checkpoint


def timed(fn, repeats: int, reduce=statistics.median) -> float:
    """`reduce` (median by default, or min for a best-of) of `fn()`'s seconds over `repeats` runs after one
    warm-up; on a GPU each run is timed from a synchronised start to a synchronised end."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return reduce(times)


def sized_model(hidden_size: int, layers: int, device: str = "cpu", **overrides) -> MetaEmbedModel:
    """A random MetaEmbed on a Qwen3 decoder of `layers` layers and width `hidden_size` (MLP 3x), on `device`;
    `overrides` go to `MetaEmbedModel.from_vlm` (e.g. keep_lm_head=True)."""
    sizes = {
        "hidden_size": hidden_size,
        "intermediate_size": 3 * hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    }
    with tempfile.TemporaryDirectory() as folder:
        make_tiny_checkpoint(
            folder, family="qwen3", num_query_vectors=16, num_candidate_vectors=64, text_overrides=sizes, **overrides
        )
        return MetaEmbedModel.from_pretrained(folder).to(device)
