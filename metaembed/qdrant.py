"""`metaembed.qdrant`, kept for code written before it moved to `metaembed.retrieval.qdrant`."""

from metaembed.retrieval.qdrant import (
    MULTIVECTOR_FLOAT_CAP,
    Edge,
    QdrantMetaEmbedIndex,
    check_multivector_cap,
    maxsim_field,
    point_id,
)

__all__ = ["QdrantMetaEmbedIndex", "Edge", "point_id", "maxsim_field", "check_multivector_cap", "MULTIVECTOR_FLOAT_CAP"]
