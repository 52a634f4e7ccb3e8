"""MetaEmbed: multimodal multi-vector embeddings with a retrieval budget chosen at test time.

The flat `*_metaembed.py` and `*_litevl.py` files are the code shipped inside every checkpoint (loaded by
`AutoModel.from_pretrained(..., trust_remote_code=True)`); this package imports them for local use:

- `configuration_metaembed`, `modeling_metaembed`, `processing_metaembed`: the config, the model (encode, score,
  build from a backbone, save), and the processor (inputs into model inputs);
- `scoring_metaembed`: MaxSim at any budget, and the tiled scan the index shares;
- `reasoning_metaembed`: Think-Then-Embed (reasoners, the trace cache, generators around a backbone);
- `sentence_metaembed`: the sentence-transformers module;
- `hub_metaembed`: a checkpoint's files: Hub lookups, atomic writes, folder upload;
- `configuration_litevl`, `modeling_litevl`, `processing_litevl`: LiteVL, the small backbone that ships here.

Shipped files import only torch, transformers, PIL (huggingface_hub through transformers; sentence-transformers
in `sentence_metaembed` only) and each other. Not shipped, for the tooling: `testing` (tiny checkpoints) and
`folders` (writing a folder atomically). This package imports nothing else of the repository.
"""

from .configuration_metaembed import MetaEmbedConfig
from .modeling_metaembed import MetaEmbedModel, MetaEmbedOutput, MetaEmbedPreTrainedModel
from .processing_metaembed import MetaEmbedProcessor
from .scoring_metaembed import maxsim

__version__ = "0.1.0"

__all__ = [
    "MetaEmbedConfig",
    "MetaEmbedModel",
    "MetaEmbedOutput",
    "MetaEmbedPreTrainedModel",
    "MetaEmbedProcessor",
    "maxsim",
]
