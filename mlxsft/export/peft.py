"""Export an mlx-lm/mlxsft LoRA/DoRA adapter as a Hugging Face PEFT adapter (the layouts: see
`mlxsft.model.peft`, which also converts PEFT adapters back for loading)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mlxsft.errors import UserError
from mlxsft.model.peft import (
    LAYER_RE,
    MLX_TO_PEFT,
    PEFT_PREFIX,
    load_tensors,
    read_adapter_json,
    save_tensors,
)


def _run_model(adapter_dir: Path) -> str | None:
    """The base model named in the run's config.yaml beside the adapter (`mlxsft train`)."""
    from mlxsft.export.hf import read_train_config

    model = read_train_config(adapter_dir).get("model")
    return str(model) if model else None


def convert_mlx_to_peft(
    adapter_dir: str | Path, *, base_model: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(PEFT weights, PEFT adapter_config) for an mlx-lm style LoRA/DoRA adapter dir."""
    d = Path(adapter_dir)
    cfg = read_adapter_json(d / "adapter_config.json")
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise UserError(
            f"a {kind!r} fine-tune has no LoRA adapter to export",
            where=str(d),
            hint="use `mlxsft fuse` (or the checkpoint itself) for full fine-tunes",
        )
    params = cfg["lora_parameters"]
    rank, scale = int(params["rank"]), float(params["scale"])
    weights: dict[str, np.ndarray] = {}
    modules: set[str] = set()
    layers: set[int] = set()
    for name, w in load_tensors(d / "adapters.safetensors").items():
        module, leaf = name.rsplit(".", 1)
        if leaf not in MLX_TO_PEFT:
            raise UserError(f"cannot export adapter tensor {name!r} to PEFT", where=str(d))
        if ".embed_tokens" in module or w.ndim > 2:
            raise UserError(
                f"PEFT export supports Linear layers only, not {module!r}", where=str(d)
            )
        weights[PEFT_PREFIX + module + "." + MLX_TO_PEFT[leaf]] = w.T if w.ndim == 2 else w
        modules.add(module.rsplit(".", 1)[-1])
        if m := LAYER_RE.search(module):
            layers.add(int(m.group(1)))
    peft_cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or cfg.get("model") or _run_model(d),
        "r": rank,
        "lora_alpha": float(params.get("alpha", scale * rank)),
        "lora_dropout": float(params.get("dropout", 0.0)),
        "target_modules": sorted(modules),
        "layers_to_transform": sorted(layers) or None,
        "use_dora": kind == "dora",
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return weights, peft_cfg


def export_peft(
    adapter_dir: str | Path, out_dir: str | Path, *, base_model: str | None = None
) -> Path:
    """Write a PEFT adapter dir (adapter_config.json + adapter_model.safetensors)."""
    weights, peft_cfg = convert_mlx_to_peft(adapter_dir, base_model=base_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "adapter_model.safetensors", weights, {"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2))
    return out
