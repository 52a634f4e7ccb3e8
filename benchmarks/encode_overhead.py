"""Encoding cost of MetaEmbed against the bare backbone on the same inputs, measured in one run.

MetaEmbed's only extra work should be the appended meta tokens: R_q per query and R_q + R_c per candidate
(the official layout). For each role this prints the backbone forward time on the bare prompts, the MetaEmbed
forward time on the same prompts with meta tokens, the measured ratio, and the ratio the extra tokens alone
predict ((L + extra) / L, linear in length; attention makes the real cost slightly super-linear).

    python benchmarks/encode_overhead.py                  # CPU, a ~20M-parameter Qwen3-shaped random backbone
    python benchmarks/encode_overhead.py --text-tokens 1024 --device cuda
"""

import argparse

import torch
from common import sized_model, timed  # benchmarks/common.py (the script folder is on sys.path)

from modeling_metaembed.processing_metaembed import parse_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-tokens", type=int, default=256, help="tokens of text per input (byte tokenizer)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = sized_model(args.hidden_size, args.layers, args.device).eval()
    processor = model.processor
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    texts = [("lorem ipsum dolor sit amet " * 200)[: args.text_tokens - i] for i in range(args.batch_size)]
    items = parse_inputs(texts)
    print(
        f"backbone: random qwen3, {parameters:.1f}M parameters, hidden {args.hidden_size}, {args.layers} layers, "
        f"device {args.device}; batch {args.batch_size} x ~{args.text_tokens} text tokens; "
        f"median of {args.repeats}"
    )
    print(
        f"{'role':>9} | {'tokens/row':>10} | {'+meta':>5} | {'backbone ms':>11} | {'MetaEmbed ms':>12} | "
        f"{'measured ratio':>14} | {'token ratio':>11}"
    )
    for role in ("query", "candidate"):
        prompts = [processor.build_prompt(item, role) for item in items]
        bare = processor.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(args.device)
        full = processor(items, role=role).to(args.device)
        extra = full["input_ids"].shape[1] - bare["input_ids"].shape[1]

        with torch.inference_mode():
            backbone_s = timed(lambda: model.vlm(**bare, use_cache=False), args.repeats)
            metaembed_s = timed(lambda: model(**full, role=role), args.repeats)
        length = bare["input_ids"].shape[1]
        print(
            f"{role:>9} | {length:>10} | {extra:>5} | {backbone_s * 1e3:>11.1f} | {metaembed_s * 1e3:>12.1f} | "
            f"{metaembed_s / backbone_s:>14.3f} | {(length + extra) / length:>11.3f}"
        )


if __name__ == "__main__":
    main()
