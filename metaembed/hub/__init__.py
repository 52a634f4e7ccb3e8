"""The Hub: getting checkpoints onto the Hugging Face Hub and official checkpoints into this format.

- `publish`: stage the exact folder to upload (training leftovers out, the model card rendered from the results),
  check that everything `from_pretrained(..., trust_remote_code=True)` and `MultiVectorEncoder(...)` need is there,
  upload (`metaembed publish`).
- `convert`: an official MetaEmbed checkpoint (or LoRA adapter) rewritten as this package's format, verified
  against the official forward (`metaembed convert`).

Model cards themselves (template, renderer, results files) are the `model_cards` package beside `metaembed`: the
quickstart writes them too. The upload of a folder is `upload_folder_to_hub`, shipped in checkpoints (in
`modeling_metaembed`) for `model.push_to_hub`.

May import: torch, PIL, safetensors, huggingface_hub, `modeling_metaembed` and `model_cards`. Never the other
rooms of `metaembed` or the command line.
"""

from .publish import PublishError, check_publishable, publish, stage_checkpoint

__all__ = ["PublishError", "check_publishable", "stage_checkpoint", "publish"]
