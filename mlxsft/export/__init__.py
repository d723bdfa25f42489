"""Shipping a fine-tune: fuse adapters into HF-format models (`fuse`, `hf`), convert adapters to and
from PEFT (`peft`), and write GGUF files with an Ollama Modelfile (`gguf`, `gguf_model`,
`gguf_vocab`, `modelfile`). Import the submodules; this package imports nothing heavy."""
