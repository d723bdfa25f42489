"""Helpers for the fuse/export tests: random (non-zero) adapters saved in mlx-lm layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_random_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    fine_tune_type: str = "lora",
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    rank: int = 4,
    alpha: float = 8.0,
    b_scale: float = 0.2,
    seed: int = 0,
) -> Path:
    """Apply LoRA/DoRA to the model in `model_dir`, randomise lora_b (and m), save to `out_dir`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxsft.model import lora
    from mlxsft.model.loading import load

    model = load(str(model_dir)).model
    config = lora.apply_adapters(
        model,
        fine_tune_type=fine_tune_type,
        rank=rank,
        alpha=alpha,
        target_modules=list(targets),
    )
    rng = np.random.default_rng(seed)
    new = []
    for name, p in tree_flatten(model.trainable_parameters()):
        if name.endswith((".lora_b", ".lora_a")):
            new.append((name, mx.array(b_scale * rng.standard_normal(p.shape).astype(np.float32))))
        elif name.endswith(".m"):  # DoRA magnitude: perturb it too
            new.append((name, p * mx.array(1 + 0.1 * rng.standard_normal(p.shape), p.dtype)))
    model.load_weights(new, strict=False)
    return lora.save_adapters(model, out_dir, config)


def adapted_logits(model_dir: Path, adapter_dir: Path | None, ids: list[int]) -> np.ndarray:
    """float32 logits (L, V) of base + adapter on `ids`."""
    from mlxsft.export.fuse import load_with_adapter, logits_of

    return logits_of(load_with_adapter(str(model_dir), adapter_dir).model, [ids])[0]
