"""Compute a frozen vision tower once per image: a training-time stand-in that returns the tower's own outputs.

With the tower frozen, its output for an image never changes, so running it again every epoch (and for every
query that shares a page) is time taken from what learns. `MemoizedTower` wraps the tower for the length of a
training run: each distinct image (keyed by a digest of its pixel tensor, so the processor's output decides what
is "the same image") goes through the tower once, in a batch with the other images seen for the first time; later
calls read the stored output. The values are the tower's, bit for bit, so training is unchanged; only time moves.
`memoized_tower(model)` swaps it in and restores the real tower afterwards (the checkpoint never sees it).
"""

import contextlib
import hashlib

import torch
from torch import nn


def pixel_digest(pixels: torch.Tensor) -> bytes:
    """A digest of one image's pixel tensor (its dtype, shape and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{pixels.dtype}{tuple(pixels.shape)}".encode())
    digest.update(pixels.detach().contiguous().cpu().numpy().tobytes())
    return digest.digest()


class MemoizedTower(nn.Module):
    """`tower(pixel_values)` computed once per distinct image; needs a tower without trainable parameters."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        trainable = [name for name, p in tower.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"only a frozen tower can be memoized; trainable: {trainable[:3]}")
        self.tower = tower
        self.outputs = {}  # digest -> output of one image
        self.calls = self.computed = 0  # images asked for / images that went through the tower

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        keys = [pixel_digest(image) for image in pixel_values]
        missing = list(dict.fromkeys(k for k in keys if k not in self.outputs))
        if missing:
            first = {key: keys.index(key) for key in missing}
            fresh = self.tower(pixel_values[[first[k] for k in missing]])
            for key, output in zip(missing, fresh):
                self.outputs[key] = output.contiguous(memory_format=torch.contiguous_format).clone()
        self.calls += len(keys)
        self.computed += len(missing)
        return torch.stack([self.outputs[k] for k in keys])


@contextlib.contextmanager
def memoized_tower(model):
    """Within the block, `model.vlm.vision_tower` is a `MemoizedTower` of itself; restored on exit."""
    tower = model.vlm.vision_tower
    model.vlm.vision_tower = memo = MemoizedTower(tower)
    try:
        yield memo
    finally:
        model.vlm.vision_tower = tower


__all__ = ["MemoizedTower", "memoized_tower", "pixel_digest"]


def ridge_map(features: torch.Tensor, targets: torch.Tensor, penalty: float) -> tuple:
    """(weight [F, T], feature mean [F], feature std [F], target mean [T]) of the ridge regression
    targets ~ ((features - mean) / std) @ weight + target mean."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    standardized = (features - mean) / std
    gram = standardized.T @ standardized + penalty * torch.eye(features.shape[1], dtype=features.dtype)
    target_mean = targets.mean(0)
    return torch.linalg.solve(gram, standardized.T @ (targets - target_mean)), mean, std, target_mean


@torch.no_grad()
def set_mlp_to_linear_map(mlp: nn.Sequential, weight: torch.Tensor, mean, std, target_mean) -> float:
    """Set a Linear(F, H) -> GELU -> Linear(H, T) projector to the best rank-H/2 approximation of the affine map
    x -> ((x - mean) / std) @ weight + target_mean, exactly: GELU(z) - GELU(-z) = z, so hidden units in pairs
    (+a.x, -a.x) pass a.x through the non-linearity unchanged. Returns the fraction of the map's energy kept."""
    first, activation, second = mlp
    if not isinstance(activation, nn.GELU) or first.out_features % 2:
        raise ValueError("expected Linear -> GELU -> Linear with an even hidden size")
    rank = first.out_features // 2
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # weight [F, T] = u diag(s) vh
    a = (u[:, :rank] * s[:rank]).T / std  # [rank, F]: acts on raw features
    b = vh[:rank].T  # [T, rank]
    first.weight.copy_(torch.cat([a, -a]).to(first.weight.dtype))
    first.bias.copy_(torch.cat([-(a @ mean), a @ mean]).to(first.bias.dtype))
    second.weight.copy_(torch.cat([b, -b], dim=1).to(second.weight.dtype))
    second.bias.copy_(target_mean.to(second.bias.dtype))
    return float((s[:rank] ** 2).sum() / (s**2).sum())
