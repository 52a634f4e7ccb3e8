"""Twemoji pages: a retrieval task whose candidates hold several things, built from the packaged Twemoji data.

A page is a square image with a grid of Twemoji (2 x 2 by default) on a plain background; a query names one item
on the page ("red apple") or two ("red apple and rocket"), or shows one item's picture (the emoji at its size on
the page, centred on an empty page). One vector per page must compress every item into one direction; several
vectors can keep the items apart, which is what a retrieval budget buys (the paper's document pages, at toy
size). On single emoji and their names (`twemoji`) there is one concept per candidate, so the budget has nothing
to buy.

Layout (`PageLayout`): `page_size` px square, `grid` x `grid` cells of `page_size / grid` px, each emoji resized
to fill its cell less `margin` px on every side, on a `background` colour. Which emoji share a page and where
each sits is a function of the seed only: round r is a seeded permutation of the emoji cut into pages of
grid * grid, so within one round every emoji is on exactly one page. Test pages are built only from the held-out
emoji of the fixed hash split (`twemoji.split_pairs`), so nothing on a test page was seen in training.
"""

import io
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

# A query names one item of its page, or two, or shows one item's picture (`render_alone`). Training pages take
# turns at them, in this order.
QUERY_KINDS = ("one item", "two items", "picture")


@dataclass(frozen=True)
class PageLayout:
    page_size: int = 192
    grid: int = 2
    margin: int = 6
    background: tuple = (255, 255, 255)

    def __post_init__(self):
        if self.grid < 1 or self.item_size < 8:
            raise ValueError(
                f"a {self.grid}x{self.grid} grid with margin {self.margin} does not fit {self.page_size} px"
            )

    @property
    def items_per_page(self) -> int:
        return self.grid * self.grid

    @property
    def item_size(self) -> int:
        """An emoji's side in px: its cell less the margin on both sides."""
        return self.page_size // self.grid - 2 * self.margin


@lru_cache(maxsize=4096)
def _emoji(path: str, size: int) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGBA").resize((size, size), Image.Resampling.LANCZOS)


def render_page(image_paths: list, layout: PageLayout) -> Image.Image:
    """The page of these emoji (row-major over the grid; None leaves a cell empty) as an RGB image."""
    if len(image_paths) != layout.items_per_page:
        raise ValueError(
            f"a {layout.grid}x{layout.grid} page holds {layout.items_per_page} emoji, got {len(image_paths)}"
        )
    page = Image.new("RGB", (layout.page_size, layout.page_size), layout.background)
    cell, size = layout.page_size // layout.grid, layout.item_size
    for slot, path in enumerate(image_paths):
        if path is None:
            continue
        row, column = divmod(slot, layout.grid)
        emoji = _emoji(str(path), size)
        page.paste(emoji, (column * cell + layout.margin, row * cell + layout.margin), emoji)
    return page


def render_alone(image_path, layout: PageLayout) -> Image.Image:
    """One emoji at the size it has on a page of `layout`, centred on an empty page: a picture query."""
    page = Image.new("RGB", (layout.page_size, layout.page_size), layout.background)
    size = layout.item_size
    emoji = _emoji(str(image_path), size)
    offset = (layout.page_size - size) // 2
    page.paste(emoji, (offset, offset), emoji)
    return page


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def page_png(image_paths: list, layout: PageLayout) -> bytes:
    return _png(render_page(image_paths, layout))


def picture_png(image_path, layout: PageLayout) -> bytes:
    return _png(render_alone(image_path, layout))


def layout_pages(pairs: list, layout: PageLayout, rounds: int, seed: int) -> list:
    """[[pair, ...] (items_per_page of them), ...]: `rounds` seeded permutations of `pairs`, each cut into pages
    (the few pairs left over in a round stay off its pages). Page p of the result is in round p // pages_per_round."""
    per_page = layout.items_per_page
    if len(pairs) < per_page:
        raise ValueError(f"{len(pairs)} emoji cannot fill a page of {per_page}")
    generator = random.Random(seed)
    pages = []
    for _ in range(rounds):
        order = list(pairs)
        generator.shuffle(order)
        pages += [order[start : start + per_page] for start in range(0, len(order) - per_page + 1, per_page)]
    return pages


def pages_per_round(num_pairs: int, layout: PageLayout) -> int:
    return num_pairs // layout.items_per_page


def _name(items: list) -> str:
    return " and ".join(item["caption"] for item in items)


def training_records(pairs: list, layout: PageLayout, rounds: int, seed: int) -> list:
    """One record per page: query -> page. Pages take turns at the three query kinds: the name of one item, the
    names of two, the picture of one (`render_alone`); the items are picked by the seed. `source` is the page's
    round: batches drawn within one source never hold two pages with the same emoji, so no in-batch negative
    answers the query. The page is PNG bytes (`{"bytes": ...}`)."""
    per_round = pages_per_round(len(pairs), layout)
    generator = random.Random(seed + 1)
    records = []
    for number, page in enumerate(layout_pages(pairs, layout, rounds, seed)):
        kind = QUERY_KINDS[number % len(QUERY_KINDS)]
        named = generator.sample(page, 2 if kind == "two items" else 1)
        if kind == "picture":
            query = {"image": {"bytes": picture_png(named[0]["image"], layout)}}
        else:
            query = {"text": _name(named)}
        records.append(
            {
                "id": f"page {number}: {kind}: {_name(named)}",
                "source": f"round {number // per_round}",
                "query": query,
                "positive": {"image": {"bytes": page_png([p["image"] for p in page], layout)}},
            }
        )
    return records


def evaluation_set(pairs: list, layout: PageLayout, round_seed: int) -> dict:
    """One round of test pages and every query it answers: each item's name (one-item queries), the names of
    disjoint pairs of items on the same page (two-item queries) and each item's picture. Returns {"pages": [PNG
    bytes], "queries": [text, or PNG bytes for a picture], "targets": [page index], "kinds": [QUERY_KINDS entry]};
    each query has exactly one right page, except a picture that two emoji share (a few Twemoji render alike:
    the Australia and Heard & McDonald Islands flags among the held-out ones), which another page shows too."""
    pages = layout_pages(pairs, layout, 1, round_seed)
    result = {"pages": [], "queries": [], "targets": [], "kinds": []}
    for number, page in enumerate(pages):
        result["pages"].append(page_png([p["image"] for p in page], layout))
        for item in page:
            result["queries"].append(_name([item]))
            result["targets"].append(number)
            result["kinds"].append(QUERY_KINDS[0])
        for start in range(0, len(page) - 1, 2):
            result["queries"].append(_name(page[start : start + 2]))
            result["targets"].append(number)
            result["kinds"].append(QUERY_KINDS[1])
        for item in page:
            result["queries"].append(picture_png(item["image"], layout))
            result["targets"].append(number)
            result["kinds"].append(QUERY_KINDS[2])
    return result


__all__ = [
    "PageLayout",
    "render_page",
    "render_alone",
    "page_png",
    "picture_png",
    "layout_pages",
    "training_records",
    "evaluation_set",
    "QUERY_KINDS",
]
