"""A MetaEmbed training step at a paper recipe's shape: step time, peak memory and model FLOPs utilisation.

The backbone has a recipe backbone's real dimensions (the config files shipped in training/recipes/backbones/,
random weights, optionally fewer layers), in bf16 with SDPA or flash attention, gradient checkpointing, LoRA
(r = alpha = 32), GradCache, the five MMR groups and the recipe's per-GPU batch, driven through
`MetaEmbedTrainer.training_step` and an AdamW step, exactly as `training.train` runs it.

    python benchmarks/training_step.py --device cuda                        # Qwen2.5-VL-3B shape, batch 64
    python benchmarks/training_step.py --device cuda --layers 12 --attn flash_attention_2
    python benchmarks/training_step.py --tiny                               # CI size, CPU, seconds

Rows are token sequences of the recipe's lengths (a query: text + R_q meta tokens; a candidate: the page's
visual tokens counted as sequence positions + R_c meta tokens). The vision tower itself does not run: it is
frozen in every recipe, and its forward is a small share of the language model's at these lengths.

Model FLOPs (what MFU counts): the forward (2 * N * tokens + attention) and the backward through the activations
(the same again), plus the weight gradients of the trainable (LoRA) parameters; not the recomputation that
GradCache's first pass and gradient checkpointing add. MFU is given against the bf16 GEMM throughput measured in
the same run (an 8192^3 matmul) and, on known GPUs, against the datasheet's dense bf16 peak.
"""

import argparse
import time
import types

import torch

PAPER_GROUPS = [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def build_model(args):
    """(MetaEmbed with LoRA on `args.device`, its config): a recipe backbone's config with random weights."""
    from transformers import AutoModel

    from metaembed_training.dry_run import _meta_config
    from metaembed_training.lora import apply_lora
    from modeling_metaembed import MetaEmbedModel

    dtype = torch.float32 if args.tiny else torch.bfloat16
    settings = {"num_query_vectors": 16, "num_candidate_vectors": 64, "matryoshka_groups": PAPER_GROUPS}
    settings.update({"tiny_family": "qwen2_5_vl"} if args.tiny else {"backbone": args.backbone})
    config, _, _ = _meta_config(settings)
    text_config = config.vlm_config.get_text_config()
    if args.layers is not None:
        text_config.num_hidden_layers = args.layers
        if getattr(text_config, "layer_types", None) is not None:
            text_config.layer_types = text_config.layer_types[: args.layers]
    config.vlm_config._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(args.device):
        vlm = AutoModel.from_config(config.vlm_config, dtype=dtype, attn_implementation=args.attn)
        ids = config.query_meta_token_ids + config.candidate_meta_token_ids
        if max(ids) >= vlm.get_input_embeddings().weight.shape[0]:
            vlm.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        model = MetaEmbedModel(config, vlm=vlm).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, r=32, alpha=32, dropout=0.05)
    return model, config


def token_rows(config, rows: int, length: int, role: str, device) -> dict:
    """A processed chunk of `rows` sequences of `length` tokens ending in the role's meta tokens."""
    meta = config.query_meta_token_ids if role == "query" else config.candidate_meta_token_ids
    content = torch.randint(0, min(meta) - 1, (rows, length - len(meta)), device=device)
    input_ids = torch.cat([content, torch.as_tensor(meta, device=device).expand(rows, -1)], dim=1)
    return {"inputs": {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, "num_placeholders": 0}


def chunks(config, rows: int, chunk: int, length: int, role: str, device) -> list:
    return [token_rows(config, min(chunk, rows - start), length, role, device) for start in range(0, rows, chunk)]


def model_flops(model, config, query_rows, query_length, candidate_rows, candidate_length) -> float:
    """Forward + activation backward (2 x forward) of every token, + trainable weight gradients; attention
    scores counted as 2 * 2 * L^2 * H per layer and sequence for the forward."""
    text = config.vlm_config.get_text_config()
    vision_parameters = sum(p.numel() for n, p in model.named_parameters() if ".visual." in n)
    language = sum(p.numel() for p in model.parameters()) - vision_parameters
    embedding_rows = model.get_base_model().get_input_embeddings()
    language -= sum(p.numel() for p in embedding_rows.parameters())  # a lookup, not a product
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0.0
    for rows, length in ((query_rows, query_length), (candidate_rows, candidate_length)):
        tokens = rows * length
        forward = 2 * language * tokens + rows * text.num_hidden_layers * 4 * length * length * text.hidden_size
        total += 2 * forward + 2 * trainable * tokens
    return total


def measured_bf16_tflops(device) -> float:
    size = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="Qwen/Qwen2.5-VL-3B-Instruct", help="a backbone of backbones.yaml")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the backbone's")
    parser.add_argument("--batch-size", type=int, default=64, help="per-GPU batch (metaembed-3b: 2048 / 32)")
    parser.add_argument("--chunk", type=int, default=16, help="GradCache rows per chunk")
    parser.add_argument("--query-tokens", type=int, default=64, help="query text tokens (+ R_q meta tokens)")
    parser.add_argument("--candidate-tokens", type=int, default=1024, help="visual + text tokens (+ R_c)")
    parser.add_argument("--negatives", type=int, default=1, help="hard negatives per query (max_negatives)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "flash_attention_2", "eager"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="CI size: a tiny random backbone on CPU")
    args = parser.parse_args()
    if args.tiny:
        args.batch_size, args.chunk, args.query_tokens, args.candidate_tokens, args.steps = 4, 2, 8, 24, 1
    device = torch.device(args.device)

    from metaembed_training.trainer import MetaEmbedTrainer, MetaEmbedTrainingArguments

    model, config = build_model(args)
    # The trainer builds a collator from the processor; these rows are already token ids, so a stand-in suffices.
    model.get_base_model().processor = types.SimpleNamespace(has_vision=False)
    training_args = MetaEmbedTrainingArguments(
        output_dir="/tmp/metaembed-training-step",
        per_device_train_batch_size=args.batch_size,
        gradcache_chunk_size=args.chunk,
        learning_rate=1e-4,
        bf16=device.type == "cuda" and not args.tiny,
        use_cpu=device.type == "cpu",
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        max_steps=args.steps + 1,
    )
    trainer = MetaEmbedTrainer(model=model, args=training_args, data_collator=lambda records: records)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + 1)
    trainer.current_gradient_accumulation_steps = 1
    query_length = args.query_tokens + config.num_query_vectors
    candidate_length = args.candidate_tokens + config.num_candidate_vectors
    candidates = args.batch_size * (1 + args.negatives)
    batch = {
        "queries": chunks(config, args.batch_size, args.chunk, query_length, "query", device),
        "candidates": chunks(config, candidates, args.chunk, candidate_length, "candidate", device),
        "negative_owners": torch.arange(args.batch_size, device=device).repeat(args.negatives),
    }

    def step():
        loss = trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    flops = model_flops(model, config, args.batch_size, query_length, candidates, candidate_length)
    gemm = measured_bf16_tflops(device)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {name}; backbone {'tiny qwen2_5_vl' if args.tiny else args.backbone}, "
        f"{config.vlm_config.get_text_config().num_hidden_layers} layers, {parameters / 1e9:.2f}B parameters "
        f"({trainable / 1e6:.1f}M trainable, LoRA r=32), attention {args.attn}, gradient checkpointing, "
        f"GradCache chunks of {args.chunk}"
    )
    print(
        f"batch: {args.batch_size} queries x {query_length} tokens, {candidates} candidates x {candidate_length} "
        f"tokens, 5 MMR groups; loss {float(loss):.3f}"
    )
    print(
        "| step time | peak memory | model TFLOP / step | achieved TFLOP/s | MFU (measured GEMM peak) | MFU (datasheet) |"
    )
    print("|---|---|---|---|---|---|")
    achieved = flops / seconds / 1e12
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    sheet = next((value for key, value in DATASHEET_BF16_TFLOPS.items() if key in name), None)
    sheet_mfu = f"{achieved / sheet:.1%} of {sheet:.0f}" if sheet else "n/a"
    print(
        f"| {seconds:.3f} s | {peak:.1f} GiB | {flops / 1e12:.1f} | {achieved:.2f} | "
        f"{achieved / gemm:.1%} of {gemm:.0f} | {sheet_mfu} |"
    )


if __name__ == "__main__":
    main()
