"""An adapter so `mteb` evaluates a MetaEmbed model at a chosen retrieval budget.

A MetaEmbed checkpoint is a sentence-transformers `MultiVectorEncoder`, which mteb (2.x) evaluates with its own
`MultiVectorWrapper` (MaxSim scoring). This sets the encoder's budget (queries keep r_q vectors, documents r_c),
declares the image modality (mteb reads modalities from a Hub config it cannot see offline), and names the run
`<name> (budget=<r_q>x<r_c>)` so results of several budgets do not overwrite each other in mteb's cache.

    import mteb
    from metaembed.evals.mteb import mteb_model

    for budget in [(1, 1), (4, 16), (16, 64)]:
        results = mteb.evaluate(mteb_model(model, budget), mteb.get_tasks(["VidoreDocVQARetrieval"]))
"""

from pathlib import Path


def mteb_model(model, budget, name: str | None = None, revision: str | None = None, **wrapper_kwargs):
    """`model` (a `MetaEmbedModel`, a `MultiVectorEncoder` of one, or a checkpoint path / repo id) wrapped for
    `mteb.evaluate` at `budget` = (r_q, r_c)."""
    from mteb.models.sentence_transformer_wrapper import MultiVectorWrapper
    from sentence_transformers import MultiVectorEncoder

    from modeling_metaembed import MetaEmbedModel
    from modeling_metaembed.sentence_metaembed import to_multi_vector_encoder

    if isinstance(model, (str, Path)):
        name = name or str(model)
        model = MultiVectorEncoder(str(model), trust_remote_code=True)
    elif isinstance(model, MetaEmbedModel):
        name = name or getattr(model, "name_or_path", None)
        model = to_multi_vector_encoder(model)
    elif not isinstance(model, MultiVectorEncoder):
        raise ValueError(f"model must be a MetaEmbedModel, a MultiVectorEncoder or a path, got {type(model).__name__}")
    module = model[0]
    if not hasattr(module, "budget"):
        raise ValueError("this MultiVectorEncoder is not a MetaEmbed model (its first module has no budget)")
    module.budget = budget  # validated against the checkpoint's (R_q, R_c)
    wrapper = MultiVectorWrapper(model, **wrapper_kwargs)
    meta = wrapper.mteb_model_meta
    wrapper.mteb_model_meta = meta.model_copy(
        update={
            "name": _mteb_name(name or meta.name),
            "revision": revision or meta.revision,
            "modalities": ["image", "text"],
            "experiment_kwargs": {"budget": f"{budget[0]}x{budget[1]}"},
        }
    )
    return wrapper


def _mteb_name(name) -> str:
    """mteb expects an "org/model" name; a local folder becomes "local/<folder name>"."""
    if not name:
        return "local/metaembed"
    path = Path(str(name))
    if path.exists() or str(name).count("/") != 1:
        return f"local/{path.name or 'metaembed'}"
    return str(name)


__all__ = ["mteb_model"]
