"""Closed-form references for examples/reproduce_claims.py: what frozen pretrained features give with no training.

- `ridge_reference` (emoji task): a ridge map from EfficientNet-Lite0's pooled features to all-MiniLM-L6-v2's
  caption embeddings, scored by cosine, its penalty picked on the last fifth of the training split;
- `pages_ridge_reference` (pages task): ridge maps from the frozen tower's features of a page, pooled or per grid
  cell, to the frozen embedding of the names on it, on the same held-out pages as the trained models.

Baselines, not the main job: the quickstart itself (metaembed.quickstart) never runs them.
"""

import io

import torch

from metaembed.quickstart.evaluation import METRIC_NAMES, held_out_pages, query_kind_masks, rank_metrics
from metaembed.quickstart.frozen_features import ridge_map
from metaembed.quickstart.pages import QUERY_KINDS, render_page
from metaembed.quickstart.settings import QuickstartSettings


@torch.no_grad()
def frozen_features(pairs: list, image_size: int = 160, batch_size: int = 64) -> tuple:
    """(image features [N, 1280]: EfficientNet-Lite0's pooled ImageNet features, caption embeddings [N, 384]:
    all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit length, as published)) of frozen pretrained models."""
    from transformers import AutoModel, AutoTokenizer

    from metaembed.quickstart.backbones import minilm_path, pretrained_efficientnet_lite
    from modeling_metaembed.processing_litevl import LiteVLImageProcessor
    from modeling_metaembed.processing_metaembed import load_image

    tower = pretrained_efficientnet_lite("lite0", image_size)
    images = LiteVLImageProcessor(image_size)
    tokenizer, text_model = (
        AutoTokenizer.from_pretrained(minilm_path()),
        AutoModel.from_pretrained(minilm_path()).eval(),
    )
    image_features, text_features = [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        pixels = images([load_image(p["image"], i, 10**7) for i, p in enumerate(batch)])["pixel_values"]
        image_features.append(tower(pixels).mean(dim=(2, 3)))
        tokens = tokenizer([p["caption"] for p in batch], padding=True, return_tensors="pt")
        states = text_model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        text_features.append(torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(image_features), torch.cat(text_features)


def _cosine_metrics(queries: torch.Tensor, candidates: torch.Tensor) -> dict:
    from metaembed_training.evaluation import recall_and_mrr

    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(candidates, dim=-1).T
    return dict(zip(METRIC_NAMES, recall_and_mrr(scores)))


def ridge_reference(train_pairs: list, test_pairs: list, image_size: int = 160) -> dict:
    """The trivial reference: ridge regression from frozen image features to frozen caption embeddings, scored
    by cosine. Its penalty is picked on the last fifth of the training split (by the sum of both directions'
    Recall@1). Returns {direction: {"recall@1": ..., "mrr": ...}, "penalty": ...}."""
    x_all, y_all = frozen_features(train_pairs + test_pairs, image_size)  # load the frozen models once
    cut_test = len(train_pairs)
    x_train, y_train, x_test, y_test = x_all[:cut_test], y_all[:cut_test], x_all[cut_test:], y_all[cut_test:]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6

    def fit(x, y, penalty):
        x = (x - mean) / std
        return torch.linalg.solve(x.T @ x + penalty * torch.eye(x.shape[1]), x.T @ y)

    def both(weights, x, y):
        predicted = ((x - mean) / std) @ weights
        return {"text-to-image": _cosine_metrics(y, predicted), "image-to-text": _cosine_metrics(predicted, y)}

    cut = len(train_pairs) * 4 // 5
    penalties = [10.0**k for k in range(0, 6)]
    scores = [
        sum(m["recall@1"] for m in both(fit(x_train[:cut], y_train[:cut], p), x_train[cut:], y_train[cut:]).values())
        for p in penalties
    ]
    penalty = penalties[max(range(len(penalties)), key=scores.__getitem__)]
    return {**both(fit(x_train, y_train, penalty), x_test, y_test), "penalty": penalty}


@torch.no_grad()
def pages_ridge_reference(
    train_pairs: list, test_pairs: list, settings: QuickstartSettings, train_rounds: int = 2, penalty: float = 1e3
) -> dict:
    """Closed-form references for the pages task, no training: ridge regression from the frozen tower's features
    of a page to the frozen all-MiniLM-L6-v2 embedding of the names on it, scored by cosine with the query's
    embedding, on the same held-out pages as the trained models.
    - "pooled": one vector per page (features averaged over the page -> mean of its names' embeddings);
    - "per cell": one vector per grid cell (features averaged over the cell -> its item's name), a page scored
      by its best cell: several vectors per page, placed with knowledge of the layout the models never get.
    Picture queries are scored against the tower's own features of the page, pooled or per cell.
    Returns {"pooled": {kind: {"recall@1", "mrr"}}, "per cell": {...}}."""
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    from metaembed.quickstart.backbones import minilm_path, pretrained_efficientnet_lite
    from metaembed.quickstart.pages import layout_pages
    from metaembed_training.evaluation import positive_ranks
    from modeling_metaembed.processing_litevl import LiteVLImageProcessor

    layout, grid = settings.layout, settings.page_grid
    tower = pretrained_efficientnet_lite("lite0", settings.image_size)
    images = LiteVLImageProcessor(settings.image_size)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    text_model = AutoModel.from_pretrained(minilm_path()).eval()

    def cell_features(pngs_or_pages):  # [P, grid*grid, C]: the tower's features averaged over each cell
        out = []
        for start in range(0, len(pngs_or_pages), 64):
            part = pngs_or_pages[start : start + 64]
            batch = [Image.open(io.BytesIO(p)) if isinstance(p, bytes) else p for p in part]
            features = tower(images(batch)["pixel_values"])  # [n, C, g, g]
            n, channels, g, _ = features.shape
            cells = features.view(n, channels, grid, g // grid, grid, g // grid).mean(dim=(3, 5))
            out.append(cells.permute(0, 2, 3, 1).reshape(n, grid * grid, channels))
        return torch.cat(out)

    def embed(texts):
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        states, mask = text_model(**tokens).last_hidden_state, tokens["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)

    train_pages = layout_pages(train_pairs, layout, train_rounds, settings.seed)
    x_cells = cell_features([render_page([p["image"] for p in page], layout) for page in train_pages])
    y_cells = embed([p["caption"] for page in train_pages for p in page]).view(len(train_pages), grid * grid, -1)
    maps = {
        "pooled": ridge_map(x_cells.mean(1), y_cells.mean(1), penalty),
        "per cell": ridge_map(x_cells.flatten(0, 1), y_cells.flatten(0, 1), penalty),
    }
    feature_mean = x_cells.flatten(0, 1).mean(0)
    ranks = {name: {kind: [] for kind in QUERY_KINDS} for name in maps}
    for round_ in held_out_pages(test_pairs, settings):
        cells, masks = cell_features(round_["pages"]), query_kind_masks(round_["kinds"])
        pictures = masks["picture"]
        is_picture = pictures.tolist()
        named = embed([q for q, picture in zip(round_["queries"], is_picture) if not picture])
        # A picture is compared with the pages in the tower's own feature space (centred, cosine): the map to the
        # names' space would only lose what tells two pictures apart.
        shown_pngs = [q for q, picture in zip(round_["queries"], is_picture) if picture]
        shown = torch.nn.functional.normalize(cell_features(shown_pngs).mean(1) - feature_mean, dim=-1)
        targets = torch.tensor(round_["targets"])
        for name, (weight, mean, std, target_mean) in maps.items():
            inputs = cells.mean(1, keepdim=True) if name == "pooled" else cells  # [P, V, C]
            vectors = torch.nn.functional.normalize(((inputs - mean) / std) @ weight + target_mean, dim=-1)
            scores = torch.empty(len(targets), len(cells))
            scores[~pictures] = torch.einsum("qd,pvd->qpv", named, vectors).amax(-1)
            features = torch.nn.functional.normalize(inputs - feature_mean, dim=-1)
            scores[pictures] = torch.einsum("qc,pvc->qpv", shown, features).amax(-1)
            found = positive_ranks(scores, targets)
            for kind, chosen in masks.items():
                ranks[name][kind].append(found[chosen])
    return {
        name: {kind: rank_metrics(torch.cat(found)) for kind, found in per_kind.items()}
        for name, per_kind in ranks.items()
    }


__all__ = ["ridge_reference", "pages_ridge_reference", "frozen_features"]
