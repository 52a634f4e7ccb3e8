"""End-to-end tour on a tiny random backbone (no Hub, no GPU, a few seconds).

Builds a MetaEmbed checkpoint folder from a tiny random Qwen2.5-VL, loads it as a user loads a published
checkpoint (`AutoModel.from_pretrained(..., trust_remote_code=True)`), encodes text, images and text+image
inputs, and scores queries against candidates at every trained budget. The weights are random: the scores show
the mechanics, not retrieval quality (issue 6's quickstart trains a real one).
"""

import argparse
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel

from modeling_metaembed.testing import make_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="where to write the checkpoint (default: a temp folder)")
    parser.add_argument("--family", default="qwen2_5_vl", help="backbone family of the tiny checkpoint")
    args = parser.parse_args()

    folder = args.output or tempfile.mkdtemp(prefix="metaembed-demo-")
    make_tiny_checkpoint(folder, family=args.family, num_query_vectors=16, num_candidate_vectors=64)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    print(f"checkpoint: {folder}  ({type(model).__name__} over {model.config.vlm_config.model_type})")

    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(64, 96, 3) * 255).astype("uint8")) for _ in range(2)]
    queries = ["a red bicycle", "a cat asleep on a sofa"]
    candidates = ["a bicycle leaning on a wall", images[0], {"text": "a sleeping cat", "image": images[1]}]

    start = time.perf_counter()
    query_vectors = model.encode_queries(queries)  # (2, 16, D)
    candidate_vectors = model.encode_candidates(candidates)  # (3, 64, D)
    print(
        f"encoded {len(queries)} queries {tuple(query_vectors.shape)} and {len(candidates)} candidates "
        f"{tuple(candidate_vectors.shape)} in {time.perf_counter() - start:.2f} s"
    )

    dim = model.config.output_dim
    print(f"\n{'budget':>9} | {'bytes/item (bf16)':>17} | scores of query 0 against the 3 candidates")
    for r_q, r_c in model.config.matryoshka_groups:
        scores = model.similarity(query_vectors, candidate_vectors, budget=(r_q, r_c))
        row = ", ".join(f"{s:7.3f}" for s in scores[0].tolist())
        print(f"{str((r_q, r_c)):>9} | {r_c * dim * 2:>17,} | {row}")
    assert torch.isfinite(scores).all()

    # The same folder is a sentence-transformers MultiVectorEncoder with the same vectors and scores.
    from sentence_transformers import MultiVectorEncoder

    encoder = MultiVectorEncoder(folder, trust_remote_code=True)
    st_scores = encoder.similarity(encoder.encode_query(queries), encoder.encode_document(candidates))
    full = model.similarity(query_vectors, candidate_vectors)
    difference = (st_scores - full).abs().max().item()
    print(f"\nsentence-transformers MultiVectorEncoder on the same folder: max |score difference| = {difference:.1e}")
    assert difference < 1e-4


if __name__ == "__main__":
    main()
