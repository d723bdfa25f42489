"""Model loading: a local HF-format directory or a hub id -> (model, tokenizer, config).

Checks a checkpoint before handing it to mlx-lm so that the common mistakes (a wrong path, pickled
`.bin` weights, an architecture mlx-lm cannot build, a broken config, no network) end in one
`ModelError` line with a hint instead of a traceback. Never runs code shipped with a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxsft.errors import ModelError
from mlxsft.model.files import (
    check_config_values,
    check_files,
    check_safetensors,
    normalize_config,
)
from mlxsft.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# Only what loading needs: never pickled weights (.bin/.pt/.pth) nor remote code (.py).
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "*.txt", "*.tiktoken"]
TOKENIZER_PATTERNS = [p for p in HUB_PATTERNS if p != "*.safetensors"]
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")


@dataclass
class Loaded:
    """A loaded model: the MLX module, the raw HF tokenizer, its config dict and local dir."""

    model: Any  # mlx.nn.Module
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    config: dict
    path: Path
    _wrapper: Any = field(default=None, repr=False)

    @property
    def tokenizer_wrapper(self) -> Any:
        """mlx-lm's TokenizerWrapper (streaming detokenizer, all eos ids), built on first use."""
        if self._wrapper is None:
            from mlxsft import _mlxlm

            eos = self.config.get("eos_token_id")
            self._wrapper = _mlxlm.load_tokenizer_wrapper(self.path, eos_token_ids=eos)
        return self._wrapper


def _redact(text: str) -> str:
    return _TOKEN.sub("hf_***", text)


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """snapshot_download with the hub's failures turned into one-line ModelErrors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hint = "pass a local HF-format directory (config.json, *.safetensors, tokenizer files)"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise ModelError(
            f"hub model {repo_id!r} is gated and this machine has no access to it",
            hint="accept its licence on huggingface.co and log in (`hf auth login`), "
            "or pass a local directory",
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"no such hub model {repo_id!r} (or it is private)",
            hint=f"check the id, or {hint}",
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"hub model {repo_id!r} has no revision {revision!r}") from None
    except HfHubHTTPError as exc:
        first = _redact(str(exc)).strip().splitlines()
        raise ModelError(
            f"cannot fetch hub model {repo_id!r}: {first[0] if first else type(exc).__name__}",
            hint=hint,
        ) from None
    except Exception as exc:
        if not isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)) and not (
            _is_network_error(exc)
        ):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the hub is unreachable"
        raise ModelError(
            f"{repo_id!r} is not a local directory, and fetching it from the Hugging Face hub "
            f"failed: {why} and it is not in the local cache",
            hint=hint,
        ) from None


def _is_network_error(exc: BaseException) -> bool:
    """Connection / timeout failures of any HTTP client the hub library may use."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"TransportError", "ConnectError", "ConnectionError", "Timeout"})


def resolve_model_path(model: str | Path, *, revision: str | None = None) -> Path:
    """A local HF-format directory, or a hub id `owner/name` fetched with only the needed files."""
    return _resolve(model, revision, HUB_PATTERNS)


def _resolve(model: str | Path, revision: str | None, patterns: list[str]) -> Path:
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from mlxsft.model.gguf_in import model_dir

        return model_dir(path)  # converted once into an MLX model dir
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                "a model must be a directory (config.json, *.safetensors, tokenizer files)",
                where=str(model),
                hint="pass the directory that holds the file",
            )
        return path.resolve()
    text = str(model)
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return _download(text, revision, patterns)
    raise ModelError(
        "model directory not found",
        where=text,
        hint="pass an existing local directory or a hub id like `Qwen/Qwen2.5-0.5B-Instruct`",
    )


def read_config(path: Path) -> dict:
    """config.json as a dict, with one-line errors when missing or malformed."""
    file = path / "config.json"
    if not file.is_file():
        raise ModelError(
            "no config.json: not a Hugging Face model directory",
            where=str(path),
            hint="pass a directory with config.json, *.safetensors and tokenizer files",
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"invalid JSON: {exc.msg}", where=f"{file}:{exc.lineno}") from None
    except UnicodeDecodeError:
        raise ModelError("config.json is not UTF-8 text", where=str(file)) from None
    if not isinstance(config, dict):
        raise ModelError("config.json must hold a JSON object", where=str(file))
    return config


def check_checkpoint(path: Path) -> dict:
    """Validate a local checkpoint dir for mlx-lm (config, architecture, weights); its config."""
    from mlxsft import _mlxlm

    check_files(path, HUB_PATTERNS)
    config = read_config(path)
    if "model_file" in config:
        raise ModelError(
            f"config.json asks to run custom code ({config['model_file']!r}); mlxsft never does",
            where=str(path / "config.json"),
            hint="use a checkpoint of an architecture mlx-lm supports",
        )
    model_type = config.get("model_type")
    supported = _mlxlm.supported_model_types()
    if not model_type:
        raise ModelError("config.json has no model_type", where=str(path / "config.json"))
    try:
        if model_type not in supported:  # e.g. "cache": an mlx-lm module that is no model
            raise ValueError(model_type)
        _mlxlm.model_classes(config)
    except (ValueError, ImportError, TypeError):
        raise ModelError(
            f"unsupported model_type {model_type!r}; mlx-lm supports: {', '.join(supported)}",
            where=str(path / "config.json"),
            hint="pick a model of a supported architecture",
        ) from None
    check_config_values(config, str(path / "config.json"))
    _check_weights(path)
    return config


def _check_weights(path: Path) -> None:
    shards = sorted(path.glob("model*.safetensors"))
    for shard in shards:
        check_safetensors(shard)
    if shards:
        return
    pickled = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLED_SUFFIXES))
    if pickled:
        raise ModelError(
            f"only pickled PyTorch weights ({', '.join(pickled[:3])}); mlxsft refuses to load "
            "pickle files, which can run arbitrary code",
            where=str(path),
            hint="convert them to safetensors (transformers: `save_pretrained(out, "
            "safe_serialization=True)`) or use a repo that ships model.safetensors",
        )
    other = sorted(p.name for p in path.glob("*.safetensors"))
    if other:
        raise ModelError(
            f"safetensors files are not in Hugging Face layout ({', '.join(other[:3])}); "
            "expected model.safetensors or model-00001-of-N.safetensors",
            where=str(path),
            hint="use the Hugging Face (transformers) version of this model",
        )
    raise ModelError(
        "no model*.safetensors weights",
        where=str(path),
        hint="a hub repo with only .bin weights is not supported; convert it to safetensors",
    )


def load_tokenizer(model: str | Path, *, revision: str | None = None) -> Any:
    """The model's Hugging Face fast tokenizer, without loading (or downloading) weights."""
    path = _resolve(model, revision, TOKENIZER_PATTERNS)
    return _load_tokenizer(path)


def _load_tokenizer(path: Path) -> Any:
    check_files(path, TOKENIZER_PATTERNS)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelError(
            "no tokenizer files (tokenizer.json / tokenizer.model)",
            where=str(path),
            hint="copy the tokenizer files of the base model into this directory",
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types; report them in one line
        first = _redact(str(exc)).strip().splitlines()
        raise ModelError(
            f"cannot load the tokenizer: {first[0] if first else type(exc).__name__}",
            where=str(path),
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            "the tokenizer has no fast (tokenizers) version; mlxsft needs its offsets",
            where=str(path),
            hint="add a tokenizer.json (e.g. save the tokenizer with a recent transformers)",
        )
    return tokenizer


def load(
    model: str | Path,
    *,
    quantize: int | None = None,
    adapter: str | Path | None = None,
    lazy: bool = False,
    revision: str | None = None,
) -> Loaded:
    """Load a model through mlx-lm: any architecture it supports, MLX-quantized ones included.

    `quantize` (4 or 8; also 2/3/5/6) quantizes a float base on load (QLoRA); `adapter` applies an
    mlx-lm style adapter dir (`adapters.safetensors` + `adapter_config.json`).
    """
    from mlxsft import _mlxlm

    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ModelError(f"cannot quantize to {quantize} bits", hint="use --quantize 4 or 8")
    path = resolve_model_path(model, revision=revision)
    raw = check_checkpoint(path)
    normalized = normalize_config(raw)  # e.g. RoPE theta from transformers 5's rope_parameters
    overrides = {k: v for k, v in normalized.items() if raw.get(k) != v}
    try:
        mlx_model, config = _mlxlm.load_model(path, lazy=lazy, overrides=overrides)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the weights: {_redact(str(exc))}", where=str(path)) from None
    if quantize is not None:
        if _mlxlm.is_quantized(mlx_model):
            bits = config.get("quantization", {}).get("bits", "?")
            raise ModelError(
                f"--quantize {quantize} given, but the checkpoint is already {bits}-bit quantized",
                where=str(path),
                hint="drop --quantize (QLoRA is used automatically for quantized checkpoints)",
            )
        mlx_model, config = _mlxlm.quantize(mlx_model, config, quantize)
    tokenizer_dir = path
    if adapter is not None:
        mlx_model = _load_adapter(mlx_model, Path(adapter))
        if (Path(adapter) / "tokenizer.json").is_file():  # trained with added tokens
            tokenizer_dir = Path(adapter)
            config = {**config, "vocab_size": _vocab_rows(Path(adapter), config)}
    tokenizer = _load_tokenizer(tokenizer_dir)
    return Loaded(model=mlx_model, tokenizer=tokenizer, config=normalize_config(config), path=path)


def _vocab_rows(adapter: Path, config: dict) -> int:
    """The embedding rows an adapter with added tokens grew the model to (adapter_config.json)."""
    try:
        entry = json.loads((adapter / "adapter_config.json").read_text()).get("trainable_tokens")
    except (OSError, json.JSONDecodeError):
        entry = None
    return int((entry or {}).get("vocab_size") or config.get("vocab_size", 0))


def _load_adapter(model: Any, adapter: Path) -> Any:
    """Apply an mlxsft / mlx-lm adapter dir, or a PEFT one (converted on the fly), to `model`."""
    import sys

    from mlxsft.model import lora
    from mlxsft.model.peft import ensure_mlx_adapter
    from mlxsft.rundir import resolve_adapter

    adapter, note = resolve_adapter(adapter)  # a run dir: its final adapter or newest checkpoint
    if note:
        print(note, file=sys.stderr)
    adapter = ensure_mlx_adapter(adapter)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter / name).is_file():
            raise ModelError(
                f"not an adapter directory: no {name}",
                where=str(adapter),
                hint="pass the output directory of `mlxsft train` (or `mlx_lm.lora`, or a PEFT adapter)",
            )
    try:
        model = lora.load_adapters(model, adapter)
    except (ValueError, KeyError) as exc:
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"cannot apply the adapter: {exc}", where=str(adapter)) from None
    model.eval()
    return model
