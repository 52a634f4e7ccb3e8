"""Why do a page's meta vectors not keep its items apart? Measurements on a quickstart checkpoint (CPU, minutes).

    python examples/diagnose_meta_tokens.py runs/quickstart/checkpoint

On held-out pages of the pages task, for the trained checkpoint and for the model that training starts from
(`build_model` + the closed-form projector, `--no-start` leaves it out), prints:

1. attention of each candidate meta token over the page (last layer, averaged over heads): its mass on the image
   tokens, per 2x2 cell, and whether vector k follows a cell (the same cell on every page) or the content;
2. how alike the vectors are: a page's R_c vectors among themselves, vector k of different pages;
3. picture queries: which candidate vector wins the MaxSim on the right page, whether it depends on the cell the
   item is in, and whether the winner attends to that cell;
4. whether the text encoder mixes the image tokens away: per layer, the mean cosine between a page's image-token
   states, and nearest-neighbour retrieval of the page from its cells' token states (a page scored by its best
   cell) against the page's pooled token states, with the picture query's own token states;
5. on training batches: the loss per MMR group, and the gradient norm of the meta rows (per candidate row) against
   the projector and the encoder layers, per group; the temperature (fixed: a training argument).
"""

import argparse
import io
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModel

from metaembed.quickstart import QuickstartSettings, load_data
from metaembed.quickstart.evaluation import TEST_PAGE_SEED, held_out_pages, rank_metrics
from metaembed.quickstart.pages import QUERY_KINDS, layout_pages, training_records
from metaembed_training.evaluation import positive_ranks


def cell_of_token(grid: int, page_grid: int) -> torch.Tensor:
    """[grid*grid] the page cell (row-major) of each image token (row-major over the feature grid)."""
    per_cell = grid // page_grid
    rows, columns = torch.div(torch.arange(grid * grid), grid, rounding_mode="floor"), torch.arange(grid * grid) % grid
    return (rows // per_cell) * page_grid + columns // per_cell


class Tracer:
    """Forward hooks on the text encoder: each layer's attention probabilities and hidden states."""

    def __init__(self, model):
        encoder = model.vlm.language_model
        self.layers = list(encoder.encoder.layer)
        self.handles = [encoder.embeddings.register_forward_hook(self._embedding_hook)]
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.attention.self.register_forward_hook(self._attention_hook(index)))
            self.handles.append(layer.register_forward_hook(self._layer_hook(index)))
        self.attentions, self.hidden = {}, {}

    def _embedding_hook(self, module, args, output):
        self.hidden[0] = output.detach()

    def _attention_hook(self, index):
        def hook(module, args, output):
            self.attentions[index] = None if output[1] is None else output[1].detach()

        return hook

    def _layer_hook(self, index):
        def hook(module, args, output):
            self.hidden[index + 1] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def trace(model, inputs: list, role: str, batch_size: int = 32) -> dict:
    """Runs the model on `inputs` (one role) with eager attention; returns per-row embeddings, the positions of the
    image tokens and meta tokens, the last layers' attention [N, heads, R, L] from the role's meta tokens, and the
    image tokens' states per layer [layers + 1, N, T, H]."""
    processor, config = model.processor, model.config
    image_id = config.vlm_config.image_token_id
    meta_ids = torch.tensor(config.query_meta_token_ids if role == "query" else config.candidate_meta_token_ids)
    tracer = Tracer(model)
    out = {"embeddings": [], "attention": [], "image_states": [], "image_mass": []}
    try:
        for start in range(0, len(inputs), batch_size):
            batch = processor(inputs[start : start + batch_size], role=role)
            output = model(**batch, role=role)
            ids = batch["input_ids"]
            is_image = ids == image_id
            meta_positions = (ids.unsqueeze(-1) == meta_ids).int().argmax(dim=1)  # [B, R]
            rows = torch.arange(ids.shape[0]).unsqueeze(-1)
            out["embeddings"].append(output.embeddings)
            per_layer = []
            for index in sorted(tracer.attentions):
                attention = tracer.attentions[index]  # [B, heads, L, L]
                from_meta = attention[rows, :, meta_positions]  # [B, R, heads, L]
                per_layer.append(from_meta.mean(2))  # [B, R, L] averaged over heads
            stacked = torch.stack(per_layer, 1)  # [B, layers, R, L]
            if bool(is_image.any()):
                count = int(is_image[0].sum())
                image_positions = is_image.int().argsort(dim=1, descending=True, stable=True)[:, :count]  # [B, T]
                gather = image_positions.unsqueeze(1).unsqueeze(1).expand(-1, stacked.shape[1], stacked.shape[2], -1)
                out["attention"].append(stacked.gather(3, gather))  # [B, layers, R, T]
                out["image_mass"].append(stacked.gather(3, gather).sum(-1))
                states = torch.stack([tracer.hidden[k] for k in sorted(tracer.hidden)])  # [layers+1, B, L, H]
                index = image_positions.unsqueeze(0).unsqueeze(-1).expand(states.shape[0], -1, -1, states.shape[-1])
                out["image_states"].append(states.gather(2, index))
    finally:
        tracer.remove()
    result = {"embeddings": torch.cat(out["embeddings"])}
    if out["attention"]:
        result["attention"] = torch.cat(out["attention"])  # [N, layers, R, T]
        result["image_mass"] = torch.cat(out["image_mass"])  # [N, layers, R]
        result["image_states"] = torch.cat(out["image_states"], dim=1)  # [layers+1, N, T, H]
    return result


def mean_offdiagonal(gram: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of [..., n, n] similarity matrices."""
    n = gram.shape[-1]
    return float(((gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * n - n)).mean())


def print_table(header: list, rows: list) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")


def entropy_effective(counts: torch.Tensor) -> float:
    p = counts.float() / counts.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def measure(name: str, model, settings: QuickstartSettings, test_pairs: list, rounds: list) -> dict:
    page_grid = settings.page_grid
    pages, cells_of_pictures, picture_queries, picture_targets = [], [], [], []
    for number, round_ in enumerate(rounds):
        offset = len(pages)
        pages += [Image.open(io.BytesIO(png)) for png in round_["pages"]]
        laid = layout_pages(test_pairs, settings.layout, 1, TEST_PAGE_SEED + number)
        if len(laid) != len(round_["pages"]):
            raise RuntimeError("the pages are not the evaluation's: the page layout code changed")
        seen = {}
        for query, target, kind in zip(round_["queries"], round_["targets"], round_["kinds"]):
            if kind != "picture":
                continue
            # pictures come in slot order within their page (evaluation_set)
            slot = seen.get(target, 0)
            seen[target] = slot + 1
            picture_queries.append(Image.open(io.BytesIO(query)))
            picture_targets.append(offset + target)
            cells_of_pictures.append(slot)
    page_trace = trace(model, pages, "candidate")
    query_trace = trace(model, picture_queries, "query")
    tokens = page_trace["attention"].shape[-1]
    grid = int(math.isqrt(tokens))
    cell = cell_of_token(grid, page_grid)  # [T]
    num_cells = page_grid * page_grid
    results = {"name": name}

    # 1. attention of each candidate meta token (last layer), mass per cell
    last = page_trace["attention"][:, -1]  # [N, R, T]
    mass = page_trace["image_mass"][:, -1]  # [N, R]
    per_cell = torch.stack([last[..., cell == c].sum(-1) for c in range(num_cells)], -1)  # [N, R, cells]
    share = per_cell / per_cell.sum(-1, keepdim=True).clamp_min(1e-12)
    top_cell = share.argmax(-1)  # [N, R]
    rows = []
    for k in range(last.shape[1]):
        counts = torch.bincount(top_cell[:, k], minlength=num_cells)
        modal = int(counts.argmax())
        p = (last[:, k] / last[:, k].sum(-1, keepdim=True)).clamp_min(1e-12)
        entropy_tokens = -(p * p.log()).sum(-1).mean()
        rows.append(
            [
                k,
                float(mass[:, k].mean()),
                " ".join(f"{v:.2f}" for v in share[:, k].mean(0).tolist()),
                float(share[:, k].max(-1).values.mean()),
                modal,
                float(counts[modal] / counts.sum()),
                float(torch.exp(entropy_tokens)),
            ]
        )
    print(f"\n[{name}] 1. last-layer attention of each candidate meta token over the page ({len(pages)} pages)")
    print_table(
        [
            "k",
            "mass on image tokens",
            f"share per cell ({num_cells} cells)",
            "top cell's share",
            "modal top cell",
            "pages with it on top",
            "effective image tokens",
        ],
        rows,
    )
    distinct = torch.tensor([len(set(row.tolist())) for row in top_cell]).float().mean()
    print(
        f"per page, distinct top cells among the {last.shape[1]} vectors: {distinct:.2f} of {num_cells}; "
        f"uniform share = {1 / num_cells:.2f}; image tokens {tokens}"
    )
    layers_mass = page_trace["image_mass"].mean((0, 2))
    layer_spec = []
    for layer in range(page_trace["attention"].shape[1]):
        att = page_trace["attention"][:, layer]
        pc = torch.stack([att[..., cell == c].sum(-1) for c in range(num_cells)], -1)
        layer_spec.append(float((pc / pc.sum(-1, keepdim=True).clamp_min(1e-12)).max(-1).values.mean()))
    print(
        "per layer (1..L), candidate meta tokens' mean mass on image tokens: "
        + ", ".join(f"{v:.2f}" for v in layers_mass.tolist())
        + "; mean top cell's share: "
        + ", ".join(f"{v:.2f}" for v in layer_spec)
    )
    results["attention"] = {"rows": rows, "distinct_top_cells": float(distinct), "layer_mass": layers_mass.tolist()}

    # 2. how alike the vectors are
    page_vectors = page_trace["embeddings"]  # [N, R, D]
    query_vectors = query_trace["embeddings"]
    within = mean_offdiagonal(page_vectors @ page_vectors.transpose(1, 2))
    same_k = mean_offdiagonal(torch.einsum("nkd,mkd->knm", page_vectors, page_vectors))
    flat = page_vectors.reshape(-1, page_vectors.shape[-1])
    owner = torch.arange(page_vectors.shape[0]).repeat_interleave(page_vectors.shape[1])
    gram = flat @ flat.T
    across_any = float(gram[owner.unsqueeze(0) != owner.unsqueeze(1)].mean())
    within_q = mean_offdiagonal(query_vectors @ query_vectors.transpose(1, 2))
    centred = torch.nn.functional.normalize(page_vectors - page_vectors.mean(0, keepdim=True), dim=-1)
    within_centred = mean_offdiagonal(centred @ centred.transpose(1, 2))
    print(f"\n[{name}] 2. how alike the vectors are (mean cosine)")
    print_table(
        [
            "a page's vectors among themselves",
            "same k, different pages",
            "any k, different pages",
            "a page's vectors, each vector k's mean over pages removed",
            "a picture query's vectors among themselves",
        ],
        [[within, same_k, across_any, within_centred, within_q]],
    )
    results["cosine"] = {
        "within_page": within,
        "same_k_across": same_k,
        "any_across": across_any,
        "within_page_centred": within_centred,
        "within_query": within_q,
    }

    # 3. MaxSim winners for picture queries on their right page
    targets = torch.tensor(picture_targets)
    cells_tensor = torch.tensor(cells_of_pictures)
    right = page_vectors[targets]  # [Q, R_c, D]
    sims = torch.einsum("qid,qjd->qij", query_vectors, right)  # [Q, R_q, R_c]
    winner = sims[:, 0].argmax(-1)  # the first query vector's winning candidate vector
    rc = page_vectors.shape[1]
    table = torch.zeros(num_cells, rc, dtype=torch.long)
    for c, w in zip(cells_tensor.tolist(), winner.tolist()):
        table[c, w] += 1
    rows = []
    for c in range(num_cells):
        counts = table[c]
        order = counts.argsort(descending=True)[:3]
        rows.append(
            [c, int(counts.sum()), ", ".join(f"k={int(k)}: {int(counts[k])}" for k in order), entropy_effective(counts)]
        )
    print(
        f"\n[{name}] 3. picture queries ({len(targets)}): the candidate vector that wins the MaxSim of query vector 0"
    )
    print("on the right page, by the cell the item is in")
    print_table(["item's cell", "queries", "most frequent winners", "effective number of winners"], rows)
    total = table.sum(0)
    joint = table.float() / table.sum()
    pc, pk = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mutual = float((joint[nz] * (joint[nz] / (pc @ pk)[nz]).log()).sum() / math.log(2))
    winner_attention = share[targets, winner]  # [Q, cells]: the winner's attention share per cell
    on_item = float((winner_attention.argmax(-1) == cells_tensor).float().mean())
    share_item = float(winner_attention[torch.arange(len(targets)), cells_tensor].mean())
    all_vectors_item = float(share[targets][torch.arange(len(targets)), :, cells_tensor].mean())
    print(
        f"winners over all cells: effective number {entropy_effective(total):.2f} of {rc}; mutual information "
        f"between the item's cell and the winner {mutual:.3f} bits (max {math.log2(num_cells):.1f}); the winner's "
        f"top-attended cell is the item's in {on_item:.3f} of queries (chance {1 / num_cells:.2f}); the winner's "
        f"attention share on the item's cell {share_item:.3f}, all {rc} vectors' {all_vectors_item:.3f}"
    )
    results["winners"] = {
        "effective": entropy_effective(total),
        "mutual_information_bits": mutual,
        "winner_attends_item_cell": on_item,
        "winner_share_item_cell": share_item,
        "all_share_item_cell": all_vectors_item,
        "table": table.tolist(),
    }

    # 4. the image tokens across the encoder's layers
    states = page_trace["image_states"]  # [layers+1, N, T, H]
    qstates = query_trace["image_states"]  # [layers+1, Q, T, H]
    rows = []
    for layer in range(states.shape[0]):
        s = torch.nn.functional.normalize(states[layer], dim=-1)
        token_cos = mean_offdiagonal(s @ s.transpose(1, 2))
        cells_mean = torch.stack([states[layer][:, cell == c].mean(1) for c in range(num_cells)], 1)  # [N, C, H]
        cells_mean = cells_mean - cells_mean.mean(0, keepdim=True)  # centred per cell position
        cells_mean = torch.nn.functional.normalize(cells_mean, dim=-1)
        pooled = states[layer].mean(1)
        pooled = torch.nn.functional.normalize(pooled - pooled.mean(0, keepdim=True), dim=-1)
        q = qstates[layer].mean(1)
        q = torch.nn.functional.normalize(q - q.mean(0, keepdim=True), dim=-1)
        per_cell_scores = torch.einsum("qh,nch->qnc", q, cells_mean).max(-1).values
        pooled_scores = q @ pooled.T
        mrr_cell = pooled_mrr = 0.0
        for round_number in range(len(rounds)):
            start = sum(len(r["pages"]) for r in rounds[:round_number])
            end = start + len(rounds[round_number]["pages"])
            chosen = (targets >= start) & (targets < end)
            count = int(chosen.sum())
            mrr_cell += (
                rank_metrics(positive_ranks(per_cell_scores[chosen][:, start:end], targets[chosen] - start))["mrr"]
                * count
            )
            pooled_mrr += (
                rank_metrics(positive_ranks(pooled_scores[chosen][:, start:end], targets[chosen] - start))["mrr"]
                * count
            )
        rows.append([layer, token_cos, mrr_cell / len(targets), pooled_mrr / len(targets)])
    print(f"\n[{name}] 4. the image tokens across the text encoder (layer 0: its input embeddings after LayerNorm)")
    print_table(
        [
            "layer",
            "mean cosine between a page's image tokens",
            "picture MRR, page = its best cell (mean token state)",
            "picture MRR, page = mean of its tokens",
        ],
        rows,
    )
    results["layers"] = rows
    scores_meta = torch.einsum("qd,nkd->qnk", query_vectors[:, 0], page_vectors)
    mrr_budgets = {}
    for rc_budget in sorted({1, 4, rc}):
        s = scores_meta[..., :rc_budget].max(-1).values
        total_mrr = 0.0
        for round_number in range(len(rounds)):
            start = sum(len(r["pages"]) for r in rounds[:round_number])
            end = start + len(rounds[round_number]["pages"])
            chosen = (targets >= start) & (targets < end)
            total_mrr += rank_metrics(positive_ranks(s[chosen][:, start:end], targets[chosen] - start))["mrr"] * int(
                chosen.sum()
            )
        mrr_budgets[rc_budget] = total_mrr / len(targets)
    print(
        "for comparison, the meta vectors (query vector 0 against the first r_c candidate vectors): picture MRR "
        + ", ".join(f"(1,{k}) {v:.3f}" for k, v in mrr_budgets.items())
    )
    results["meta_mrr_picture"] = mrr_budgets
    return results


def gradient_report(name: str, model, settings: QuickstartSettings, train_pairs: list, batches: int) -> dict:
    """Loss per MMR group and gradient norms per parameter group and per MMR group, on `batches` training batches
    of one round (as the trainer draws them), with dropout on as in training."""
    from metaembed_training import ContrastiveDataset
    from metaembed_training.data import MetaEmbedCollator
    from metaembed_training.loss import MatryoshkaContrastiveLoss, group_name

    records = training_records(train_pairs, settings.layout, 1, settings.seed)
    dataset = ContrastiveDataset(records)
    collator = MetaEmbedCollator(model.processor)
    groups = model.config.matryoshka_groups
    loss_fn = MatryoshkaContrastiveLoss(
        groups, temperature=settings.temperature, score_normalization=settings.score_normalization
    )
    embeddings = model.vlm.get_input_embeddings().weight
    query_ids = torch.tensor(model.config.query_meta_token_ids)
    candidate_ids = torch.tensor(model.config.candidate_meta_token_ids)
    encoder_layers = list(model.vlm.language_model.encoder.layer)
    parameter_groups = {
        "projector": list(model.vlm.projector.parameters()),
        **{f"encoder layer {i + 1}": list(layer.parameters()) for i, layer in enumerate(encoder_layers)},
        "encoder embeddings (position, LayerNorm)": [
            p for n, p in model.vlm.language_model.embeddings.named_parameters() if "word_embeddings" not in n
        ],
    }
    model.train()
    torch.manual_seed(settings.seed)
    sums = {}
    row_norms = {group_name(g): torch.zeros(len(candidate_ids)) for g in groups}
    group_losses = {group_name(g): 0.0 for g in groups}
    for b in range(batches):
        inputs = collator([dataset[i] for i in range(b * settings.batch_size, (b + 1) * settings.batch_size)])
        queries = torch.cat([model(**c["inputs"], role="query").embeddings for c in inputs["queries"]])
        candidates = torch.cat([model(**c["inputs"], role="candidate").embeddings for c in inputs["candidates"]])
        _, per_group = loss_fn(queries, candidates, None, None)
        params = [embeddings] + [p for ps in parameter_groups.values() for p in ps]
        for g_index, (gname, loss_g) in enumerate(per_group.items()):
            group_losses[gname] += float(loss_g.detach()) / batches
            grads = torch.autograd.grad(loss_g, params, retain_graph=g_index < len(per_group) - 1, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            meta_grad = grads[0]
            entry = sums.setdefault(gname, {})
            entry["candidate meta rows"] = (
                entry.get("candidate meta rows", 0.0) + float(meta_grad[candidate_ids].norm()) / batches
            )
            entry["query meta rows"] = entry.get("query meta rows", 0.0) + float(meta_grad[query_ids].norm()) / batches
            row_norms[gname] += meta_grad[candidate_ids].norm(dim=-1) / batches
            position = 1
            for pname, ps in parameter_groups.items():
                norm = torch.sqrt(sum((g**2).sum() for g in grads[position : position + len(ps)]))
                entry[pname] = entry.get(pname, 0.0) + float(norm) / batches
                position += len(ps)
    model.eval()
    names = list(next(iter(sums.values())).keys())
    print(
        f"\n[{name}] 5. on {batches} training batches of {settings.batch_size} (round 0, dropout on): loss per MMR "
        f"group (uniform = log({settings.batch_size}) = {math.log(settings.batch_size):.3f}; tau = "
        f"{settings.temperature}, fixed; score normalization {settings.score_normalization!r}) and the gradient norm "
        "of each parameter group from that group's loss alone"
    )
    print_table(
        ["parameter group"] + [f"{g} (loss {group_losses[g]:.3f})" for g in sums],
        [[pname] + [sums[g][pname] for g in sums] for pname in names],
    )
    print("gradient norm of each candidate meta row k, per MMR group:")
    print_table(
        ["group"] + [str(k) for k in range(len(candidate_ids))],
        [[g] + [float(v) for v in row_norms[g]] for g in row_norms],
    )
    rows = embeddings.detach()[candidate_ids]
    vocab = embeddings.detach()[: min(candidate_ids.min(), query_ids.min())]
    print(
        f"candidate meta rows: norm {float(rows.norm(dim=-1).mean()):.3f} (vocabulary rows {float(vocab.norm(dim=-1).mean()):.3f}); "
        f"mean cosine between them {mean_offdiagonal((torch.nn.functional.normalize(rows, dim=-1) @ torch.nn.functional.normalize(rows, dim=-1).T)[None]):.3f}; "
        f"an AdamW step at the meta rate {settings.meta_learning_rate} moves a row by about "
        f"{settings.meta_learning_rate * math.sqrt(rows.shape[-1]):.3f}"
    )
    return {"losses": group_losses, "grad_norms": sums, "row_norms": {g: v.tolist() for g, v in row_norms.items()}}


def start_model(settings: QuickstartSettings, train_pairs: list, folder: Path):
    """The model training starts from: `build_model` (from_vlm, the seed's meta rows) and the closed-form projector."""
    from metaembed.quickstart.job import build_model, warm_start_projector

    model = build_model(settings, folder)
    if settings.projector_init == "closed_form":
        warm_start_projector(model, train_pairs, settings)
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a quickstart checkpoint folder (its summary.json is one level up)")
    parser.add_argument("--rounds", type=int, default=1, help="held-out rounds of pages to measure (default 1)")
    parser.add_argument("--batches", type=int, default=3, help="training batches for the gradient report (0: none)")
    parser.add_argument("--no-start", action="store_true", help="skip the untrained (start) model")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--name", help="the checkpoint's label in the output (default: its run folder's name)")
    args = parser.parse_args(argv)
    print("command: python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    checkpoint = Path(args.checkpoint)
    summary = json.loads((checkpoint.parent / "summary.json").read_text())
    # a run from before meta_regions existed trained free meta tokens
    settings = QuickstartSettings(**{"meta_regions": None, **summary["settings"]})
    if settings.task != "pages":
        raise SystemExit(
            f"{checkpoint}: the diagnostics read the pages task; this one was trained on {settings.task!r}"
        )
    train_pairs, test_pairs = load_data(settings)
    rounds = held_out_pages(test_pairs, settings)[: args.rounds]
    print(f"{checkpoint}: {sum(len(r['pages']) for r in rounds)} held-out pages; kinds {QUERY_KINDS}")
    torch.manual_seed(0)
    trained = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, attn_implementation="eager").eval()
    models = [(args.name or checkpoint.parent.name, trained)]
    with tempfile.TemporaryDirectory() as work:
        if not args.no_start:
            start = start_model(settings, train_pairs, Path(work))
            start.set_attn_implementation("eager")
            models.insert(0, ("start", start))
        output = {}
        for name, model in models:
            assert model.config.vlm_config._attn_implementation == "eager", "attention probabilities need eager"
            output[name] = measure(name, model, settings, test_pairs, rounds)
            if args.batches:
                output[name]["gradients"] = gradient_report(name, model, settings, train_pairs, args.batches)
    if args.json:
        Path(args.json).write_text(json.dumps(output, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
