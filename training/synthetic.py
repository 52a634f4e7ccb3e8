"""A small learnable retrieval task for tests, benchmarks and smoke runs (no download).

Each record holds a few random pseudo-words; the query lists them in one order, the positive in reverse order
behind a fixed prefix, and the hard negative shares all but one word with the positive. A model must learn
which words matter (order does not) to retrieve the positive.
"""

import random
import string


def synthetic_records(count: int, seed: int = 0, words_per_record: int = 3, vocabulary: int = 300, sources=1) -> list:
    """`count` training records (see `training.data`) of the synthetic task, spread over `sources` sources."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(string.ascii_lowercase) for _ in range(4)) for _ in range(vocabulary)})
    records = []
    for index in range(count):
        chosen = rng.sample(words, words_per_record)
        swapped = chosen[:-1] + [rng.choice([w for w in words if w not in chosen])]
        records.append(
            {
                "id": f"synthetic-{seed}-{index}",
                "source": f"source-{index % sources}",
                "query": {"text": " ".join(chosen)},
                "positive": {"text": "about " + " ".join(reversed(chosen))},
                "negatives": [{"text": "about " + " ".join(reversed(swapped))}],
            }
        )
    return records
