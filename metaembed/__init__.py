"""MetaEmbed's library and tools beyond the model itself (which is `modeling_metaembed`).

Rooms, one per concept; each one's `__init__` says what it holds and what it may import:

- `retrieval/`: `MetaEmbedIndex`, the compiled CPU scan (`scan_kernel`, `csrc/`), Qdrant, the embeddings file.
- `serving/`: the vLLM plugin, model classes and clients, and sharded, resumable encoding.
- `evals/`: the paper's MMEB and ViDoRe benchmarks with a budget sweep, and the mteb adapter.
- `quickstart/`: the main job (`./run quickstart`): its task, data, backbone, training, evaluation and report.
- `hub/`: publishing checkpoints to the Hub and converting official checkpoints.

On top of them, this package holds the command line: `cli` (the `metaembed` command, `python -m metaembed`:
`__main__`) and `inputs` (the files it reads inputs from). `index`, `qdrant`, `scan_kernel` and `backbones` here
are thin re-exports of their new homes, kept for code written against the old names.

Dependencies run one way: the command line may import every room; `evals` may import `retrieval`; `serving` may
import `retrieval` (the embeddings file); the rooms import `modeling_metaembed`, `training` (evals, quickstart)
and `model_cards` (quickstart, hub), never the command line; `modeling_metaembed` imports none of them
(`tests/test_layout.py` checks all of this, and that no import circle is left).
"""
