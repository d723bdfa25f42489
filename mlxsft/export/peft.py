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
    PEFT_TOKEN_MODULES,
    TOKEN_KEYS,
    load_tensors,
    read_adapter_json,
    save_tensors,
)
from mlxsft.rundir import ADAPTER_CONFIG


def _run_model(adapter_dir: Path) -> str | None:
    """The base model named in the run's config.yaml beside the adapter (`mlxsft train`)."""
    from mlxsft.rundir import read_config

    model = read_config(adapter_dir).get("model")
    return str(model) if model else None


def convert_mlx_to_peft(
    adapter_dir: str | Path, *, base_model: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(PEFT weights, PEFT adapter_config) for an mlx-lm style LoRA/DoRA adapter dir."""
    d = Path(adapter_dir)
    cfg = read_adapter_json(d / ADAPTER_CONFIG)
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
    base_model = base_model or cfg.get("model") or _run_model(d)
    tensors = load_tensors(d / "adapters.safetensors")
    if (d / "token_rows.safetensors").is_file():
        tensors.update(load_tensors(d / "token_rows.safetensors"))
    tokens = cfg.get("trainable_tokens")
    if tokens:
        weights.update(_token_values(tensors, tokens, base_model, d))
    for name, w in tensors.items():
        module, leaf = name.rsplit(".", 1)
        if leaf == "delta":
            continue
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
        "base_model_name_or_path": base_model,
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
    if tokens:
        idx = list(tokens["indices"])
        names = [PEFT_TOKEN_MODULES[m] for m in tokens.get("modules", ["embedding"])]
        peft_cfg["trainable_token_indices"] = (
            {name: idx for name in names} if len(names) > 1 else idx
        )
    return weights, peft_cfg


def _token_values(
    tensors: dict[str, np.ndarray], tokens: dict[str, Any], base_model: str | None, d: Path
) -> dict[str, np.ndarray]:
    """PEFT tensors for mlxsft token-row deltas: base rows + delta (PEFT stores the new rows, so
    this needs the base model)."""
    if not base_model:
        raise UserError(
            "the adapter trains token rows; PEFT stores the rows themselves, so exporting needs "
            "the base model",
            where=str(d),
            hint="pass --model BASE",
        )
    import mlx.core as mx

    from mlxsft.model.loading import load
    from mlxsft.model.token_rows import EMBEDDING, HEAD, base_rows, delta_key, resize_vocab

    model = load(base_model, lazy=True).model
    resize_vocab(model, int(tokens.get("vocab_size", 0)))  # --add-chat-tokens: mean rows
    out = {}
    for module in (EMBEDDING, HEAD):
        key = delta_key(module)
        if key in tensors:
            rows = base_rows(model, module, tokens["indices"]) + mx.array(tensors[key])
            out[PEFT_PREFIX + TOKEN_KEYS[key]] = np.array(rows.astype(mx.float32))
    return out


def export_peft(
    adapter_dir: str | Path, out_dir: str | Path, *, base_model: str | None = None
) -> Path:
    """Write a PEFT adapter dir (adapter_config.json + adapter_model.safetensors)."""
    weights, peft_cfg = convert_mlx_to_peft(adapter_dir, base_model=base_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "adapter_model.safetensors", weights, {"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2))
    if (Path(adapter_dir) / "tokenizer.json").is_file():  # added tokens: ship the tokenizer
        from mlxsft.export.hf import copy_tokenizer

        copy_tokenizer(Path(adapter_dir), out)
    return out
