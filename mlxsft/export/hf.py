"""Write a Hugging Face format model directory from an MLX model.

`config.json`, sharded `model*.safetensors` with HF weight names (mlx-lm models keep them) and an
index when there is more than one shard, the tokenizer files and chat template of the base model,
`generation_config.json`, and a model card `README.md` (base model, data, adapter/training config,
final metrics when the adapter dir has them, the fuse fidelity report).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mlxsft import rundir
from mlxsft.model.files import normalize_config
from mlxsft.rundir import ADAPTER_CONFIG

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
MAX_SHARD_BYTES = 5 * 2**30


def shard_weights(
    weights: dict[str, Any], max_bytes: int = MAX_SHARD_BYTES
) -> list[dict[str, Any]]:
    """Split `weights` (name -> array with .nbytes) into shards of at most `max_bytes`."""
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name in sorted(weights):
        w = weights[name]
        if shards[-1] and size + w.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    return shards


def save_weights(
    out: Path, weights: dict[str, Any], *, quantized: bool, max_bytes: int
) -> list[str]:
    """Write `model.safetensors` or `model-0000i-of-0000N.safetensors` + index; file names."""
    import mlx.core as mx

    shards = shard_weights(weights, max_bytes)
    metadata = {"format": "mlx" if quantized else "pt"}

    def write(name: str, shard: dict[str, Any]) -> None:
        with open(out / name, "wb") as f:  # a Python file: a full disk raises (mlx's does not)
            mx.save_safetensors(f, shard, metadata=metadata)

    if len(shards) == 1:
        write("model.safetensors", shards[0])
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write(name, shard)
        weight_map.update({k: name for k in shard})
        names.append(name)
    index = {
        "metadata": {"total_size": sum(w.nbytes for w in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def copy_tokenizer(src: Path, out: Path) -> list[str]:
    """Copy the tokenizer files (and chat template) that exist in `src`; their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def _generation_config(src: Path, config: dict) -> dict:
    if (src / "generation_config.json").is_file():
        return json.loads((src / "generation_config.json").read_text(encoding="utf-8"))
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config.get(k) is not None}


def final_metrics(adapter_dir: Path | None) -> dict[str, Any]:
    """The last `train` and `eval` rows of the run's metrics.jsonl (train keys get a `train_`
    prefix, eval's step is `eval_step`), or {}."""
    if adapter_dir is None:
        return {}
    run = rundir.run_of(adapter_dir) or adapter_dir
    if run is None or not (run / rundir.METRICS).is_file():
        return {}
    last: dict[str, dict] = {}
    for row in rundir.read_metrics(run, strict=False):
        last[str(row.get("type", "train"))] = row
    final: dict[str, Any] = {}
    for kind in ("train", "eval"):
        for k, v in last.get(kind, {}).items():
            if k == "type" or not isinstance(v, (int, float, str)):
                continue
            if kind == "train":
                key = k if k.startswith("train") else f"train_{k}"
            else:
                key = "eval_step" if k == "step" else k
            final[key] = round(v, 6) if isinstance(v, float) else v
    return final


def _table(d: dict[str, Any]) -> list[str]:
    rows = ["| key | value |", "|---|---|"]
    for k, v in d.items():
        if v is None:
            continue
        text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
        rows.append(f"| {k} | {text.replace('|', '/')} |")
    return rows


def model_card(
    base_model: str, adapter_dir: Path | None, fidelity: dict[str, Any] | None, config: dict
) -> str:
    """README.md text: YAML header for the Hub, then base model, data, config, metrics."""
    adapter_cfg: dict[str, Any] = {}
    if adapter_dir is not None and (adapter_dir / ADAPTER_CONFIG).is_file():
        adapter_cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    train_cfg = rundir.read_config(adapter_dir)
    kind = adapter_cfg.get("fine_tune_type", "lora")
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: mlx",
        "tags: [mlx, mlxsft, fine-tuned, " + kind + "]",
        "---",
        "",
        f"# {base_model} fine-tuned with mlxsft",
        "",
        f"- Base model: `{base_model}` ({config.get('model_type', '?')})",
    ]
    data = train_cfg.get("data") or adapter_cfg.get("data")
    if data:
        lines.append(f"- Data: `{data}`")
    if adapter_dir is not None:
        lines.append(f"- Adapter: `{adapter_dir.name}` ({kind}), merged into the weights")
    q = config.get("quantization")
    lines.append(f"- Weights: {q['bits']}-bit (MLX)" if q else "- Weights: unquantized")
    if adapter_cfg:
        lines += ["", "## Adapter", "", *_table(adapter_cfg)]
    if train_cfg:
        lines += ["", "## Training configuration", "", *_table(train_cfg)]
    metrics = final_metrics(adapter_dir)
    if metrics:
        lines += ["", "## Final metrics", "", *_table(metrics)]
    if fidelity:
        lines += ["", "## Fuse fidelity (base + adapter vs fused)", "", *_table(fidelity)]
    lines += [
        "",
        "## Use",
        "",
        "```",
        "mlxsft generate --model <this dir> --prompt 'Hello'",
        "```",
        "",
    ]
    return "\n".join(lines)


def save_hf_model(
    out_dir: str | Path,
    model: Any,
    config: dict,
    source: Path,
    *,
    base_model: str | None = None,
    adapter_dir: Path | None = None,
    fidelity: dict[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write `model` (an mlx-lm module) with `config` as an HF directory at `out_dir`."""
    from mlx.utils import tree_flatten

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    leftover = [k for k in weights if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")]
    assert not leftover, f"unfused adapter weights: {leftover[:3]}"
    save_weights(out, weights, quantized="quantization" in config, max_bytes=max_shard_bytes)
    config = normalize_config(config)  # both RoPE spellings: every transformers version reads it
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    copy_tokenizer(source, out)
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer.json").is_file():
        copy_tokenizer(Path(adapter_dir), out)  # tokens added in training (--add-chat-tokens)
    gen = _generation_config(source, config)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    card = model_card(base_model or source.name, adapter_dir, fidelity, config)
    (out / "README.md").write_text(card, encoding="utf-8")
    return out
