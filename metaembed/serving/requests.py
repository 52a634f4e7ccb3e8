"""vLLM prompts for MetaEmbed inputs, built exactly as `MetaEmbedProcessor` builds model inputs.

Text-only inputs become token ids (the processor's own tokenisation, so no engine-side special tokens can differ);
inputs with an image become the processor's prompt text with the image placeholder plus the decoded, capped image
(`load_image`: RGB, transparency on white, downscaled to the checkpoint's `max_image_tokens`), which vLLM's processor
for the backbone expands into visual tokens. The meta tokens of the role end every prompt, so the engine's pooler
finds them by id. Every prompt is checked as `MetaEmbedProcessor` checks its rows (each of the role's meta tokens
exactly once, with its message), and a query prompt must not hold candidate meta tokens (the engine's pooler
tells the roles apart by them). No vLLM import here: the HTTP server's request plugin and the offline client share this code.
"""

import torch

from modeling_metaembed.processing_metaembed import (
    EncodeItem,
    MetaEmbedProcessor,
    load_image,
    parse_inputs,
    per_item_instructions,
)


def build_prompts(processor: MetaEmbedProcessor, inputs, role: str, instruction=None) -> list:
    """One vLLM prompt dict per input (`{"prompt_token_ids": [...]}` or `{"prompt": str, "multi_modal_data":
    {"image": PIL}}`). Validates like `model.encode`: errors name the offending item."""
    items = inputs if inputs and all(isinstance(i, EncodeItem) for i in inputs) else parse_inputs(inputs)
    if not items:
        raise ValueError("inputs are empty: nothing to encode")
    processor.check_items(items)
    instructions = per_item_instructions(instruction, len(items))
    suffix = "".join(processor.config.meta_tokens(role))
    tokenizer = processor.tokenizer
    add_special_tokens = not processor.uses_chat_template  # as MetaEmbedProcessor.__call__
    candidate_ids = set(tokenizer.convert_tokens_to_ids(list(processor.config.candidate_meta_tokens)))
    prompts = []
    for item, item_instruction in zip(items, instructions):
        text = processor.build_prompt(item, role, item_instruction) + suffix
        # The text's own tokens: the image placeholder, if any, is one token here (vLLM expands it later).
        ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        processor._check_meta_tokens(torch.tensor([ids]), [item], role)  # model.encode's check and message
        if role == "query" and candidate_ids.intersection(ids):
            raise ValueError(
                f"item {item.index}: its query prompt holds a candidate meta token string (in its "
                "instruction or template); vLLM would read it as a candidate"
            )
        if item.image is None:
            prompts.append({"prompt_token_ids": ids})
        else:
            image = load_image(item.image, item.index, processor.max_image_pixels)
            prompts.append({"prompt": text, "multi_modal_data": {"image": image}})
    return prompts


__all__ = ["build_prompts"]
