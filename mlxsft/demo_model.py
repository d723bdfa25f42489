"""Tiny HF-format checkpoints and in-process trained tokenizers, for `mlxsft demo` and the tests.

`build_tokenizer` trains a small byte-level BPE tokenizer (deterministic, no network) with the
special and chat-marker tokens real models use; `build_tiny_checkpoint` writes a directory that
`mlx_lm.load`, `transformers.AutoTokenizer` and `mlxsft.model.loading.load` all read: config.json
(HF keys), model.safetensors (HF weight names, seeded random weights, optionally MLX-quantized),
tokenizer.json, tokenizer_config.json and generation_config.json.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHAT_MARKERS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "[INST]",
    "[/INST]",
]
SPECIAL_TOKENS = [PAD, BOS, EOS, *CHAT_MARKERS]  # ids 0.. in this order

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# Whether the real models' tokenizers prepend BOS (Qwen and Phi-3 do not).
_ADD_BOS = {"qwen2": False, "qwen3": False, "phi3": False}

_WORDS = {
    "subj": "the cat|a dog|my friend|the teacher|our team|the robot|a child|the farmer|she|he|we|they",
    "verb": "likes|sees|builds|finds|reads|writes|paints|carries|cooks|moves|counts|explains",
    "adj": "red|small|quiet|happy|old|new|bright|heavy|simple|strange|green|warm",
    "obj": "apple|book|house|river|song|letter|garden|boat|cake|map|window|story",
    "place": "in the park|at home|by the sea|on the hill|in the city|at school|under the tree",
    "time": "today|yesterday|every morning|at night|on Monday|in spring|after lunch",
}
_EXTRA = [
    "What is 2 + 3? It is 5.",
    "Question: how many days are in a week? Answer: 7.",
    "Translate 'hello' to French: bonjour.",
    "The price is $12.50, not $15.00!",
    "Call me at 555-0199; e-mail: test@example.com.",
    "Lists: (a) one, (b) two, [c] three; {d} four.",
    "He said: \"Yes.\" She said: 'No.'",
    "Café, naïve, über, façade, jalapeño.",
    "日本語のテキスト。 Привет мир. 🙂👍",
    "def add(a, b):\n    return a + b",
    "1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 3.14 0.5 -7 42%",
    "#, *, /, \\, |, ~, ^, &, @, =, <, >, _, `",
    "You are a helpful assistant.",
    "Summarise the text in one sentence.",
    "Write a short poem about the sea.",
    "Sure! Here is a short answer.",
    "The user asks the assistant a question; the system and the model answer.",
    "Instruction: Input: Response: Output: Context: Human: Assistant: User: System:",
]


def default_corpus(n_sentences: int = 300, seed: int = 0) -> list[str]:
    """A few hundred short varied English sentences plus digits, punctuation and unicode."""
    rng = random.Random(seed)
    pick = {k: v.split("|") for k, v in _WORDS.items()}
    out = []
    for i in range(n_sentences):
        s = f"{rng.choice(pick['subj'])} {rng.choice(pick['verb'])} the {rng.choice(pick['adj'])} "
        s += f"{rng.choice(pick['obj'])} {rng.choice(pick['place'])} {rng.choice(pick['time'])}"
        s = s[0].upper() + s[1:]
        end = ".!?"[i % 3]
        out.append(f"{s}{end} Number {rng.randint(0, 9999)}, item #{i}.")
    return out + _EXTRA * 3


def resolve_chat_template(chat_template: str | None) -> str | None:
    """A built-in template's name (`chatml`, `llama3`, ..., see data/builtin_templates) or Jinja."""
    from mlxsft.config import BUILTIN_TEMPLATES as BUILTIN
    from mlxsft.data.templates import builtin_source

    if chat_template is None or "{" in chat_template:
        return chat_template
    if chat_template not in BUILTIN:
        raise ValueError(f"unknown tiny chat template {chat_template!r}; one of {list(BUILTIN)}")
    return builtin_source(chat_template)


def build_tokenizer(
    out_dir: str | Path,
    *,
    corpus: list[str] | None = None,
    vocab_size: int = 512,
    chat_template: str | None = None,
    special_tokens: list[str] | None = None,
    add_bos_token: bool = True,
    model_max_length: int = 4096,
) -> Path:
    """Train a byte-level BPE tokenizer in-process and save tokenizer.json + tokenizer_config.json.

    Special tokens take ids 0.. in `SPECIAL_TOKENS` order (`<pad>`=0, `<s>`=1, `</s>`=2). With
    `add_bos_token`, encoding prepends `<s>` (a Llama-3 style post-processor); offsets are not
    trimmed, so character spans map exactly to tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(special_tokens) if special_tokens is not None else list(SPECIAL_TOKENS)
    if vocab_size < 256 + len(specials):  # byte-level BPE always holds the 256 byte tokens
        raise ValueError(f"vocab_size must be at least {256 + len(specials)}, got {vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else default_corpus(), trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos_token and BOS in specials:
        bos_id = tok.token_to_id(BOS)
        template = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0",
            pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
            special_tokens=[(BOS, bos_id)],
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    tok.save(str(out / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS if BOS in specials else None,
        "eos_token": EOS if EOS in specials else None,
        "pad_token": PAD if PAD in specials else None,
        "unk_token": None,
        "add_bos_token": bool(add_bos_token),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    template = resolve_chat_template(chat_template)
    if template is not None:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out


def _hf_config(arch: str, vocab_size: int, **kw) -> dict:
    """An HF-style config.json dict for a tiny model of `arch`."""
    hidden, n_heads = kw["hidden_size"], kw["n_heads"]
    config = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": kw["intermediate_size"],
        "num_hidden_layers": kw["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": kw["n_kv_heads"],
        "head_dim": hidden // n_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": kw["tie_word_embeddings"],
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": kw["dtype"],
    }
    if arch == "qwen2":
        config.update(attention_bias=True, rope_theta=1000000.0)
    elif arch == "qwen3":
        config.update(rope_theta=1000000.0)
    elif arch in ("gemma", "gemma2"):
        config.update(hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)
        if arch == "gemma2":
            config.update(
                query_pre_attn_scalar=hidden // n_heads,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                sliding_window=4096,
            )
    elif arch == "phi3":
        config.update(original_max_position_embeddings=4096)
    return config


def _seeded_weights(model, seed: int) -> dict:
    """Replace every parameter by seeded random values (NumPy RNG: no global MLX state)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        shape = tuple(p.shape)
        if len(shape) >= 2:  # (out, in) or (vocab, dim)
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        elif name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape)
        else:  # norm weights: around their (deterministic) init value
            w = np.asarray(p, dtype=np.float64) + 0.1 * rng.standard_normal(shape)
        weights[name] = mx.array(w.astype(np.float32))
    return weights


def _stop_ids(path: Path) -> int | list[int]:
    """EOS and the chat template's end-of-turn token, as generation derives them."""
    from mlxsft.data.render import Renderer
    from mlxsft.data.templates import resolve_template
    from mlxsft.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(path))
    template = resolve_template("tokenizer", tokenizer) if tokenizer.chat_template else None
    ids = sorted(Renderer(tokenizer, template).stop_ids)
    return ids[0] if len(ids) == 1 else ids


def build_tiny_checkpoint(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    chat_template: str | None = None,
    quantize_bits: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    corpus: list[str] | None = None,
) -> Path:
    """Write a tiny HF-format checkpoint of `arch` to `out_dir` and return its path.

    `vocab_size` is the embedding size; the tokenizer is trained to at most that many tokens.
    `quantize_bits` writes an MLX-quantized checkpoint exactly as `mlx_lm.convert -q` does.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxsft import _mlxlm

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; one of {list(ARCHS)}")
    out = Path(out_dir)
    build_tokenizer(
        out,
        corpus=corpus,
        vocab_size=vocab_size,
        chat_template=chat_template,
        add_bos_token=_ADD_BOS.get(arch, True),
    )
    config = _hf_config(
        arch,
        vocab_size,
        hidden_size=hidden_size,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        dtype=dtype,
    )
    model = _mlxlm.build_model(config)
    model.load_weights(list(_seeded_weights(model, seed).items()))
    model.set_dtype(getattr(mx, dtype))
    metadata = {"format": "pt"}
    if quantize_bits is not None:
        model, config = _mlxlm.quantize(model, config, quantize_bits)
        metadata = {"format": "mlx"}
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata=metadata)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    generation = {"bos_token_id": 1, "eos_token_id": _stop_ids(out), "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out
