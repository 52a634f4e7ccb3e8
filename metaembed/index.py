"""`metaembed.index`, kept for code written before the index moved to `metaembed.retrieval.index`."""

from metaembed.retrieval.index import FORMAT, IndexFileError, MetaEmbedIndex, SearchResult, quantize

__all__ = ["MetaEmbedIndex", "SearchResult", "IndexFileError", "quantize", "FORMAT"]
