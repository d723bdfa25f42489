"""A deterministic, readable tokenizer for data-path tests, built in-process (no files, no network).

Words, single punctuation characters and whitespace runs are each one token (WordLevel over a regex
split), so expected token lists read like the text: ["<s>", "Hello", ",", " ", "world"]. Chat
markers of the common families are registered as special tokens. Wrapped in transformers'
PreTrainedTokenizerFast, so offsets, `apply_chat_template` and `decode` behave like a real one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SPECIALS = [
    "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>", "<|endoftext|>",
]  # fmt: skip
PIECE = r"\w+|[^\w\s]|\s+"
BASE_CORPUS = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "### Input:\n### Response:\n system user assistant tool ipython model [INST] [/INST] "
    "[TOOL_CALLS] [TOOL_RESULTS] [/TOOL_RESULTS] name arguments parameters tool_call "
    '<tool_call></tool_call> {}":, 0123456789'
)


def build_tokenizer(
    texts: Iterable[str] = (), *, add_bos: bool = True, bos: str = "<s>", eos: str = "</s>",
    chat_template: str | None = None,
):  # fmt: skip
    """A PreTrainedTokenizerFast whose vocabulary covers BASE_CORPUS and `texts`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces: set[str] = set()
    for text in (BASE_CORPUS, *texts):
        for chunk in re.split("|".join(map(re.escape, SPECIALS)), text):
            pieces.update(re.findall(PIECE, chunk))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for piece in sorted(pieces):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>"
    )
    if chat_template is not None:
        out.chat_template = chat_template
    return out


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def trained_tokens(tokenizer, encoded) -> list[str]:
    return [
        t for t, m in zip(tokens(tokenizer, encoded.input_ids), encoded.loss_mask, strict=True) if m
    ]
