"""Where can a checkpoint's candidate meta tokens look, and what would reading one region each be worth?

    python examples/meta_row_capacity.py runs/quickstart/checkpoint            # about 3 minutes on 2 cores
    python examples/meta_row_capacity.py runs/quickstart/checkpoint --start    # the model training starts from
    python examples/meta_row_capacity.py runs/quickstart/checkpoint --steps 0  # the first two parts only

Issue 32 found that every trained free meta token spreads its last-layer attention evenly over the page, so a
page's vectors are copies of one summary. On the held-out pages of the quickstart's first test round, this prints:

1. where the image tokens sit, read back per layer: a ridge classifier's accuracy for each image token's page cell
   and grid index from its state, and the share of the states' variance that is the position;
2. the value of vectors that read one region each, with no weight changed: candidate meta token k masked to
   region k (the page's cells; or tiles of the image that ignore the layout), picture MRR per budget;
3. whether a meta token's row alone can steer it to one cell: everything frozen except the R_c candidate meta rows,
   which Adam (their training rate) pushes to put meta token k's last-layer attention on page cell k mod 4, a
   target that uses the layout the model never gets; then the target cell's share of the image attention, how
   alike a page's vectors are (each vector k's mean over pages removed), and picture MRR.
"""

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import torch
from diagnose_meta_tokens import cell_of_token, trace  # examples/, beside this script
from PIL import Image
from transformers import AutoModel

from metaembed.quickstart import QuickstartSettings, load_data
from metaembed.quickstart.evaluation import held_out_pages
from metaembed.quickstart.pages import training_records
from metaembed_training.evaluation import positive_ranks
from modeling_metaembed.modeling_metaembed import grid_tiles


class LastLayerAttention:
    """Keeps the last text-encoder layer's attention probabilities, with their graph (eager attention)."""

    def __init__(self, model):
        self.value = None
        layer = model.vlm.language_model.encoder.layer[-1].attention.self
        self.handle = layer.register_forward_hook(lambda module, args, output: setattr(self, "value", output[1]))


def candidate_attention(model, batch, hook, cells: torch.Tensor, num_cells: int):
    """-> ([B, R, cells] attention mass per page cell from each candidate meta token, [B, R, D] embeddings)."""
    output = model(**batch, role="candidate")
    ids = batch["input_ids"]
    meta_ids = torch.tensor(model.config.candidate_meta_token_ids)
    meta_positions = (ids.unsqueeze(-1) == meta_ids).int().argmax(dim=1)  # [B, R]
    is_image = ids == model.config.vlm_config.image_token_id
    count = int(is_image[0].sum())
    image_positions = is_image.int().argsort(dim=1, descending=True, stable=True)[:, :count]  # [B, T]
    attention = hook.value.mean(1)  # [B, L, L] averaged over heads
    rows = torch.arange(ids.shape[0]).unsqueeze(-1)
    from_meta = attention[rows, meta_positions]  # [B, R, L]
    to_image = from_meta.gather(2, image_positions.unsqueeze(1).expand(-1, from_meta.shape[1], -1))  # [B, R, T]
    per_cell = torch.stack([to_image[..., cells == c].sum(-1) for c in range(num_cells)], -1)  # [B, R, cells]
    return per_cell, output.embeddings


@torch.no_grad()
def evaluate(model, pages, queries, picture_targets, hook, cells, num_cells) -> dict:
    masses, embeddings = [], []
    for start in range(0, len(pages), 32):
        batch = model.processor(pages[start : start + 32], role="candidate")
        per_cell, emb = candidate_attention(model, batch, hook, cells, num_cells)
        masses.append(per_cell)
        embeddings.append(emb)
    per_cell, pages_emb = torch.cat(masses), torch.cat(embeddings)  # [N, R, cells], [N, R, D]
    share = per_cell / per_cell.sum(-1, keepdim=True)
    target = torch.arange(per_cell.shape[1]) % num_cells
    target_share = share.gather(2, target.view(1, -1, 1).expand(share.shape[0], -1, 1)).mean()
    centred = pages_emb - pages_emb.mean(0, keepdim=True)
    centred = torch.nn.functional.normalize(centred, dim=-1)
    gram = centred @ centred.transpose(1, 2)
    n = gram.shape[-1]
    within = float((gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)).mean() / (n * n - n))
    return {
        "target cell's share": float(target_share),
        "top cell's share": float(share.max(-1).values.mean()),
        "mass on image": float(per_cell.sum(-1).mean()),
        "within-page cosine, k's mean removed": within,
        "picture MRR": picture_mrr(model, queries, pages_emb, picture_targets),
    }


def tiling(grid: int, levels: list) -> torch.Tensor:
    """[regions, grid*grid] the tiles of each level n in turn (`grid_tiles`: n x n, row-major); n = 1 is the whole
    image."""
    return torch.cat([grid_tiles(grid, n) for n in levels])


def picture_mrr(model, queries: torch.Tensor, pages: torch.Tensor, targets: list) -> dict:
    """Picture MRR per budget: encoded queries [Q, R_q, D] against encoded pages [N, R_c, D]."""
    result = {}
    for budget in ((1, 1), (2, 4), (4, 16)):
        ranks = positive_ranks(model.similarity(queries, pages, budget=budget), torch.tensor(targets))
        result[f"{budget[0]}x{budget[1]}"] = float((1.0 / ranks.float()).mean())
    return result


@torch.no_grad()
def cell_restricted_mrr(model, pages, queries, picture_targets, regions, layers: int = 1) -> dict:
    """The value of vectors that read one region each, on this model as trained: in its last `layers` layers,
    candidate meta token k may attend to the image tokens of region k mod len(regions) only (other tokens as
    before); no weight changes. Picture MRR per budget of the encoded queries against the same pages (the
    mask does not touch the query side)."""
    state = {}

    def restrict(module, args, kwargs):
        mask = kwargs["attention_mask"]
        blocked = state["blocked"]  # [B, L, L] True: meta row k may not see that image token
        if mask.dtype == torch.bool:
            kwargs["attention_mask"] = mask & ~blocked.unsqueeze(1)
        else:
            kwargs["attention_mask"] = mask.masked_fill(blocked.unsqueeze(1), torch.finfo(mask.dtype).min)
        return args, kwargs

    encoder_layers = model.vlm.language_model.encoder.layer
    handles = [
        layer.attention.self.register_forward_pre_hook(restrict, with_kwargs=True) for layer in encoder_layers[-layers:]
    ]
    meta_ids = torch.tensor(model.config.candidate_meta_token_ids)
    embeddings = []
    try:
        for start in range(0, len(pages), 32):
            batch = model.processor(pages[start : start + 32], role="candidate")
            ids = batch["input_ids"]
            is_image = ids == model.config.vlm_config.image_token_id
            meta_positions = (ids.unsqueeze(-1) == meta_ids).int().argmax(dim=1)  # [B, R]
            blocked = torch.zeros(ids.shape[0], ids.shape[1], ids.shape[1], dtype=torch.bool)
            rows = torch.arange(ids.shape[0])
            for k in range(len(meta_ids)):
                outside = torch.zeros(ids.shape, dtype=torch.bool)
                outside[is_image] = (~regions[k % len(regions)]).repeat(ids.shape[0])
                blocked[rows, meta_positions[:, k]] = outside
            state["blocked"] = blocked
            embeddings.append(model(**batch, role="candidate").embeddings)
    finally:
        for handle in handles:
            handle.remove()
    return picture_mrr(model, queries, torch.cat(embeddings), picture_targets)


@torch.no_grad()
def position_readability(model, fit_pages: list, test_pages: list, grid: int, page_grid: int) -> list:
    """Per layer: how well a ridge classifier reads each image token's page cell and its index in the grid back
    from its state (fitted on `fit_pages`, scored on `test_pages`), and the share of the states' variance that is
    the same for every page at that grid position."""
    fit, test = (
        trace(model, fit_pages, "candidate")["image_states"],
        trace(model, test_pages, "candidate")["image_states"],
    )
    tokens = fit.shape[2]
    labels = {"cell": cell_of_token(grid, page_grid), "index": torch.arange(tokens)}
    rows = []
    for layer in range(fit.shape[0]):
        x_fit, x_test = fit[layer].reshape(-1, fit.shape[-1]).double(), test[layer].reshape(-1, fit.shape[-1]).double()
        mean = x_fit.mean(0)
        x_fit, x_test = x_fit - mean, x_test - mean
        row = {"layer": layer}
        for name, label in labels.items():
            targets = torch.nn.functional.one_hot(label.repeat(fit.shape[1]), int(label.max()) + 1).double()
            weight = torch.linalg.solve(
                x_fit.T @ x_fit + torch.eye(x_fit.shape[1], dtype=x_fit.dtype), x_fit.T @ targets
            )
            row[f"{name} accuracy"] = float(
                ((x_test @ weight).argmax(-1) == label.repeat(test.shape[1])).double().mean()
            )
        states = test[layer].double()  # [N, T, H]
        per_position = states.mean(0)
        total = ((states - states.mean((0, 1))) ** 2).sum()
        row["position share"] = float(states.shape[0] * ((per_position - per_position.mean(0)) ** 2).sum() / total)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument(
        "--start", action="store_true", help="probe the model training starts from (the checkpoint's settings)"
    )
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    print("command: python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    torch.manual_seed(0)
    checkpoint = Path(args.checkpoint)
    ran = json.loads((checkpoint.parent / "summary.json").read_text())["settings"]
    settings = QuickstartSettings(**{"meta_regions": None, **ran})  # runs from before meta_regions: free meta tokens
    train_pairs, test_pairs = load_data(settings)
    if args.start:
        import tempfile

        from metaembed.quickstart.job import build_model, warm_start_projector

        work = tempfile.TemporaryDirectory()
        model = build_model(settings, Path(work.name))
        warm_start_projector(model, train_pairs, settings)
        model.set_attn_implementation("eager")
        model.eval()
    else:
        model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, attn_implementation="eager").eval()
    hook = LastLayerAttention(model)
    grid = int(math.isqrt(model.config.vlm_config.num_image_tokens))
    num_cells = settings.page_grid**2
    cells = cell_of_token(grid, settings.page_grid)

    round_ = held_out_pages(test_pairs, settings)[0]
    pages = [Image.open(io.BytesIO(png)) for png in round_["pages"]]
    picture_queries, picture_targets = [], []
    for query, target, kind in zip(round_["queries"], round_["targets"], round_["kinds"]):
        if kind == "picture":
            picture_queries.append(Image.open(io.BytesIO(query)))
            picture_targets.append(target)
    queries = model.encode_queries(picture_queries, batch_size=32)  # the probes below change candidates only
    train_pages = [r["positive"]["image"]["bytes"] for r in training_records(train_pairs, settings.layout, 1, 0)]
    readability = position_readability(
        model, [Image.open(io.BytesIO(png)) for png in train_pages[:128]], pages, grid, settings.page_grid
    )
    print(f"where the image tokens sit, read back per layer (chance: cell 1/{num_cells}, index 1/{grid * grid}):")
    for row in readability:
        print(
            f"  layer {row['layer']}: cell {row['cell accuracy']:.3f}, index {row['index accuracy']:.3f}, "
            f"position's share of the variance {row['position share']:.3f}"
        )
    results = {"position readability": readability}
    results["before"] = evaluate(model, pages, queries, picture_targets, hook, cells, num_cells)
    print("before:", json.dumps(results["before"]))
    all_layers = len(model.vlm.language_model.encoder.layer)
    page_cells = torch.stack([cells == c for c in range(num_cells)])
    for label, regions, layers in (
        ("page cells", page_cells, 1),
        ("page cells", page_cells, all_layers),
        ("tiles 1, 2x2, 3x3", tiling(grid, [1, 2, 3]), all_layers),
        ("tiles 1, 3x3", tiling(grid, [1, 3]), all_layers),
        ("tiles 1, 3x3, 4x4", tiling(grid, [1, 3, 4]), all_layers),
    ):
        mrr = cell_restricted_mrr(model, pages, queries, picture_targets, regions, layers)
        results[f"{label}, last {layers} layers"] = mrr
        print(f"meta token k reads region k ({label}) in the last {layers} layer(s): picture MRR", json.dumps(mrr))
    if args.steps == 0:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        return

    for p in model.parameters():
        p.requires_grad_(False)
    table = model.vlm.get_input_embeddings().weight
    rows = torch.tensor(model.config.candidate_meta_token_ids)
    meta = torch.nn.Parameter(table[rows].detach().clone())
    optimizer = torch.optim.Adam([meta], lr=args.learning_rate)
    target = torch.arange(len(rows)) % num_cells
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(args.steps):
        chosen = torch.randint(len(train_pages), (args.batch_size,), generator=generator).tolist()
        batch = model.processor([Image.open(io.BytesIO(train_pages[i])) for i in chosen], role="candidate")
        with torch.no_grad():
            table[rows] = meta.detach()
        # route the gradient to `meta`: the rows enter as meta + (table row - meta), the second term constant
        embed = model.vlm.get_input_embeddings()
        handle = embed.register_forward_hook(
            lambda module, inputs, output: (
                output + (inputs[0].unsqueeze(-1) == rows).float() @ (meta - meta.detach())
            )  # [B, L, H]
        )
        try:
            per_cell, _ = candidate_attention(model, batch, hook, cells, num_cells)
        finally:
            handle.remove()
        on_target = per_cell.gather(2, target.view(1, -1, 1).expand(per_cell.shape[0], -1, 1)).squeeze(-1)
        loss = -(on_target.clamp_min(1e-6).log()).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f}, mass on target cell {on_target.mean().item():.3f}")
    with torch.no_grad():
        table[rows] = meta.detach()
    print(f"optimised {args.steps} steps in {time.perf_counter() - started:.0f} s")
    results["after"] = evaluate(model, pages, queries, picture_targets, hook, cells, num_cells)
    print("after:", json.dumps(results["after"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
