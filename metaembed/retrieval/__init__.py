"""Retrieval: searching stored candidate embeddings at any budget (r_q, r_c).

- `index`: `MetaEmbedIndex`, the exact nested-budget index (bf16 / fp16 / fp32, int8 and binary with an exact
  re-score) as a list of segments, `save` / `load` (memory-mappable) and `SearchResult`.
- `segment`: one segment's rows: storage dtypes and codes (`quantize`), the scan (kernel or torch), the exact
  re-score of a shortlist, and its files.
- `index_files`: an index folder on disk: its segments, the manifest listing them, the crash-safe switch.
- `index_build`: an index built or appended to from chunks, straight into a new segment (bounded memory).
- `scan_kernel` with `csrc/maxsim_scan.cpp`: the compiled CPU MaxSim scan (AMX, AVX2) and the choice of kernel.
- `qdrant`: `QdrantMetaEmbedIndex`, the same index stored in and searched by Qdrant (a server, local mode, or
  `Edge`, Qdrant's engine in this process).
- `embeddings_file`: the embeddings format, a folder of shards with ids beside them (`save_embeddings`,
  `iter_embeddings`, `load_embeddings`).
- `safetensors_header`: where a safetensors file's tensors lie, for memory maps and streamed copies.

May import: torch, numpy, safetensors, and `modeling_metaembed` (the scoring functions, atomic writes); Qdrant's
packages only inside the functions that need them. Never the other rooms (serving, evals, quickstart, hub) or the
command line, which build on this one.
"""

from .index import IndexFileError, MetaEmbedIndex, SearchResult
from .qdrant import Edge, QdrantMetaEmbedIndex

__all__ = ["MetaEmbedIndex", "SearchResult", "IndexFileError", "QdrantMetaEmbedIndex", "Edge"]
