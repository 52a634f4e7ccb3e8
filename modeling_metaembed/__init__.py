"""MetaEmbed: multimodal multi-vector embeddings with a retrieval budget chosen at test time.

The flat `*_metaembed.py` files are the code shipped inside every checkpoint (loaded by
`AutoModel.from_pretrained(..., trust_remote_code=True)`); this package imports them for local use.
"""

from .configuration_metaembed import MetaEmbedConfig
from .modeling_metaembed import MetaEmbedModel, MetaEmbedOutput, MetaEmbedPreTrainedModel
from .processing_metaembed import MetaEmbedProcessor
from .scoring_metaembed import maxsim

__version__ = "0.1.0"

__all__ = ["MetaEmbedConfig", "MetaEmbedModel", "MetaEmbedOutput", "MetaEmbedPreTrainedModel",
           "MetaEmbedProcessor", "maxsim"]
