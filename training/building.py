"""What a recipe's `model` and `data` sections build: `build_model` (the model to train, weights and all) and
`build_data` (the train and held-out datasets). Its own module so that `training.train` (the entry point) and
`training.dry_run` (which `training.train` calls) share them without importing each other.
"""

from pathlib import Path


def build_model(settings: dict):
    import torch

    from modeling_metaembed import MetaEmbedModel

    settings = dict(settings)
    dtype = settings.pop("dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if "checkpoint" in settings:
        return MetaEmbedModel.from_pretrained(settings.pop("checkpoint"), dtype=dtype)
    if "tiny_family" in settings:  # a tiny random backbone (tests, smoke runs): no download
        import tempfile

        from modeling_metaembed.testing import make_tiny_checkpoint

        family = settings.pop("tiny_family")
        folder = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="tiny-metaembed-")), family=family, **settings)
        return MetaEmbedModel.from_pretrained(folder, dtype=dtype)
    if "backbone" not in settings:
        raise SystemExit("error: the model section needs a backbone, a checkpoint or a tiny_family")
    return MetaEmbedModel.from_vlm(settings.pop("backbone"), dtype=dtype, **settings)


def build_data(settings: dict):
    from metaembed_training.data import (
        ContrastiveDataset,
        load_colpali_train,
        load_jsonl,
        load_mmeb_train,
        split_holdout,
    )
    from metaembed_training.synthetic import synthetic_records

    parts = []
    for path in settings.get("jsonl", []) or []:
        parts.append(load_jsonl(path))
    if settings.get("mmeb_train"):
        mmeb = dict(settings["mmeb_train"])
        parts.append(load_mmeb_train(mmeb["subsets"], image_root=mmeb["image_root"]))
    if settings.get("colpali_train"):
        parts.append(load_colpali_train(settings["colpali_train"]))
    if settings.get("synthetic"):
        parts.append(ContrastiveDataset(synthetic_records(**settings["synthetic"])))
    if not parts:
        raise SystemExit("error: the data section names no data (jsonl, mmeb_train, colpali_train or synthetic)")
    dataset = ContrastiveDataset.concatenate(parts)  # lazy: records are read (and images decoded) when used
    fraction = settings.get("holdout_fraction")
    if fraction:
        return split_holdout(dataset, fraction=fraction, seed=settings.get("holdout_seed", 0))
    return dataset, None


__all__ = ["build_data", "build_model"]
