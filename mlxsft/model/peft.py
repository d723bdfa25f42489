"""Hugging Face PEFT LoRA adapters <-> mlx-lm/mlxsft ones: the two layouts, and loading a PEFT dir.

mlx-lm: `adapters.safetensors` with `<module>.lora_a` (in, r) and `<module>.lora_b` (r, out),
output `W x + scale * (x A) B`; `adapter_config.json` {fine_tune_type, num_layers,
lora_parameters{rank, scale, dropout, keys}} adapting the last `num_layers` blocks.
PEFT: `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` (r, in) and
`lora_B.weight` (out, r), output `W x + (lora_alpha / r) B A x`; `adapter_config.json` with
peft_type LORA, r, lora_alpha, target_modules, layers_to_transform. DoRA's magnitude `m` (out,)
maps to PEFT's `lora_magnitude_vector` (both normalise each output row of W + scale B A).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from mlxsft.errors import UserError

PEFT_PREFIX = "base_model.model."
MLX_TO_PEFT = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "m": "lora_magnitude_vector"}
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# mlxsft token-row deltas -> PEFT `trainable_token_indices` tensors; PEFT keeps the new rows
# themselves (values), mlxsft their difference to the base (model/token_rows.py).
TOKEN_KEYS = {
    "model.embed_tokens.delta": "model.embed_tokens.token_adapter.trainable_tokens_delta",
    "lm_head.delta": "lm_head.token_adapter.trainable_tokens_delta",
}
_TOKEN_SUFFIX = ".token_adapter.trainable_tokens_delta"
# mlxsft "trainable_tokens" module names -> PEFT's (the last part of the module path)
PEFT_TOKEN_MODULES = {
    ours: peft_key.removesuffix(_TOKEN_SUFFIX).rsplit(".", 1)[-1]
    for ours, peft_key in zip(("embedding", "head"), TOKEN_KEYS.values(), strict=True)
}


def is_peft_adapter(adapter_dir: str | Path) -> bool:
    """True for a PEFT adapter dir (adapter_config.json with peft_type + adapter_model.*)."""
    d = Path(adapter_dir)
    cfg = d / "adapter_config.json"
    if not cfg.is_file() or not (d / "adapter_model.safetensors").is_file():
        return False
    try:
        return "peft_type" in json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as NumPy arrays (bfloat16 read through MLX as float32)."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # bf16 tensors: NumPy has no bfloat16
        if "bf16" not in str(exc).lower() and "bfloat16" not in str(exc).lower():
            raise
    import mlx.core as mx

    return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(path)).items()}


def save_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata)
    # safetensors writes through a private temp file (mode 0600); give it the mode of any new file
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_adapter_json(path: Path) -> dict:
    """An adapter dir's adapter_config.json (either layout)."""
    if not path.is_file():
        raise UserError(
            f"no {path.name}",
            where=str(path.parent),
            hint="pass an adapter directory (the output of `mlxsft train`)",
        )
    return json.loads(path.read_text(encoding="utf-8"))


def convert_peft_to_mlx(
    adapter_dir: str | Path,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(mlx-lm adapter weights, mlx-lm adapter_config) for a PEFT LoRA/DoRA adapter dir.

    `num_layers` is -1 (every block gets LoRA layers): blocks the PEFT adapter leaves alone keep
    mlx-lm's init (lora_b = 0, DoRA m = |W|), which is exactly the base model.
    """
    d = Path(adapter_dir)
    cfg = read_adapter_json(d / "adapter_config.json")
    if cfg.get("peft_type") != "LORA":
        raise UserError(
            f"only PEFT LORA adapters are supported, not {cfg.get('peft_type')!r}", where=str(d)
        )
    for key, ok in (("use_rslora", False), ("bias", "none"), ("modules_to_save", None)):
        if key == "modules_to_save" and cfg.get("trainable_token_indices") is not None:
            continue  # PEFT may list the wrapped embedding there too
        if cfg.get(key, ok) not in (ok, [], False):
            raise UserError(f"PEFT option {key}={cfg[key]!r} is not supported", where=str(d))
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError("PEFT rank_pattern/alpha_pattern are not supported", where=str(d))
    rank = int(cfg["r"])
    weights: dict[str, np.ndarray] = {}
    keys: set[str] = set()
    to_mlx = {v: k for k, v in MLX_TO_PEFT.items()}
    from_token_keys = {v: k for k, v in TOKEN_KEYS.items()}
    for name, w in load_tensors(d / "adapter_model.safetensors").items():
        if not name.startswith(PEFT_PREFIX):
            raise UserError(f"unexpected PEFT tensor name {name!r}", where=str(d))
        name = name[len(PEFT_PREFIX) :].replace(".default.", ".")
        if name in from_token_keys:  # new rows (values), turned into deltas when loaded
            weights[from_token_keys[name]] = w
            continue
        if name.endswith(".lora_magnitude_vector.weight"):  # older PEFT checkpoints
            name = name[: -len(".weight")]
        leaf = next((p for p in to_mlx if name.endswith("." + p)), None)
        if leaf is None:
            raise UserError(f"cannot convert PEFT tensor {name!r}", where=str(d))
        module = name[: -len(leaf) - 1]
        weights[f"{module}.{to_mlx[leaf]}"] = w.T if w.ndim == 2 else w
        keys.add(LAYER_RE.split(module)[-1] if LAYER_RE.search(module) else module)
    mlx_cfg = {
        "fine_tune_type": "dora" if cfg.get("use_dora") else "lora",
        "num_layers": -1,
        "lora_parameters": {
            "rank": rank,
            "scale": float(cfg["lora_alpha"]) / rank,
            "dropout": float(cfg.get("lora_dropout", 0.0)),
            "keys": sorted(keys),
        },
        "model": cfg.get("base_model_name_or_path"),
    }
    indices = cfg.get("trainable_token_indices")
    if indices is not None:
        mlx_cfg["trainable_tokens"] = _token_entry(indices, d)
    return weights, mlx_cfg


def _token_entry(indices: list[int] | dict[str, list[int]], d: Path) -> dict[str, Any]:
    """PEFT `trainable_token_indices` (a list for the embedding, or {module: list}) -> the
    "trainable_tokens" entry of an mlxsft adapter_config (rows stored as values)."""
    names = ["embedding"]
    if isinstance(indices, dict):
        to_ours = {v: k for k, v in PEFT_TOKEN_MODULES.items()}
        ours = {to_ours.get(k.rsplit(".", 1)[-1]) for k in indices}
        lists = {tuple(v) for v in indices.values()}
        if None in ours or "embedding" not in ours or len(lists) != 1:
            raise UserError(
                f"trainable_token_indices {indices} is not supported: the same rows of "
                f"{' and '.join(PEFT_TOKEN_MODULES.values())} only",
                where=str(d),
            )
        names += ["head"] if "head" in ours else []
        indices = list(lists.pop())
    return {"indices": [int(i) for i in indices], "modules": names, "form": "values"}


def import_peft(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the mlx-lm adapter dir (adapters.safetensors + adapter_config.json) of a PEFT one."""
    weights, cfg = convert_peft_to_mlx(adapter_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {k: weights.pop(k) for k in list(weights) if k in TOKEN_KEYS}
    save_tensors(out / "adapters.safetensors", weights, {"format": "mlx"})
    if rows:
        save_tensors(out / "token_rows.safetensors", rows, {"format": "mlx"})
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def ensure_mlx_adapter(adapter_dir: str | Path, cache_root: str | Path | None = None) -> Path:
    """`adapter_dir` itself for an mlx-lm adapter; for a PEFT one, a converted mlx-lm copy.

    The copy goes to `<cache_root or temp dir>/mlxsft-peft-<hash>` (keyed by the PEFT dir's path
    and file times), so loaders that take an mlx-lm adapter dir accept PEFT dirs too; the PEFT
    dir itself is never written to.
    """
    import hashlib
    import tempfile

    d = Path(adapter_dir)
    if not is_peft_adapter(d):
        return d
    files = [d / "adapter_config.json", d / "adapter_model.safetensors"]
    key = str(d.resolve()) + "".join(str(f.stat().st_mtime_ns) for f in files)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return import_peft(d, Path(cache_root or tempfile.gettempdir()) / f"mlxsft-peft-{digest}")
