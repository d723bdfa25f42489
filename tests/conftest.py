"""Session-wide test fixtures: tiny HF-format checkpoints built once per session, no network.

Subdirectories add their own fixtures in their own conftest.py files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Before anything imports huggingface_hub (it reads these once, at import time).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `tiny_checkpoint(arch="llama", **kw) -> Path`, cached per (arch, kw).

    Keyword arguments are those of `mlxsft.demo_model.build_tiny_checkpoint`. Treat the returned
    directory as read-only; copy it (shutil.copytree) before changing files in it.
    """
    from mlxsft.demo_model import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", **kw) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = build_tiny_checkpoint(root / f"{arch}-{len(cache)}", arch, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoint) -> Path:
    """Llama with a ChatML chat template and untied embeddings (adds BOS)."""
    return tiny_checkpoint("llama", chat_template="chatml", tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama_base(tiny_checkpoint) -> Path:
    """A base Llama: no chat template, tied embeddings."""
    return tiny_checkpoint("llama", chat_template=None, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_checkpoint) -> Path:
    """Qwen2 (q/k/v biases), ChatML template, tied embeddings, no BOS."""
    return tiny_checkpoint("qwen2", chat_template="chatml", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_gemma(tiny_checkpoint) -> Path:
    """Gemma (scaled embeddings, 1+w norms, always tied) with the Gemma template."""
    return tiny_checkpoint("gemma", chat_template="gemma", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_phi3(tiny_checkpoint) -> Path:
    """Phi-3 (fused qkv_proj / gate_up_proj) with the Phi-3 template, untied, no BOS."""
    return tiny_checkpoint("phi3", chat_template="phi3", tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama_q4(tiny_checkpoint) -> Path:
    """An MLX 4-bit quantized Llama (as `mlx_lm.convert -q` writes it), ChatML template."""
    return tiny_checkpoint(
        "llama", chat_template="chatml", tie_word_embeddings=False, quantize_bits=4
    )


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """`<repo root>/../shared/fixtures` (real chat templates, tokenizers); skips when absent."""
    path = (REPO_ROOT / ".." / "shared" / "fixtures").resolve()
    if not path.is_dir():
        pytest.skip(f"shared fixtures not found at {path}")
    return path
