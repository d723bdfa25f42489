"""`{% generation %}` templates: rendered like transformers, their spans are the assistant spans
(same ids and mask as transformers' `return_assistant_tokens_mask`), and spans that disagree
with the rendered-prefix method are reported."""

from __future__ import annotations

import numpy as np
import pytest

from mlxsft.data.generation_tag import CLOSE, OPEN, has_generation_tags, strip_marks
from mlxsft.data.render import Renderer
from mlxsft.data.templates import resolve_template
from mlxsft.data.types import Encoded, Example, Message

TAGGED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The tag leaves the end-of-turn marker out, which the rendered-prefix method includes.
NARROW = TAGGED.replace(
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}",
    "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>\\n' }}",
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Sort: 3 1 2"},
    {"role": "assistant", "content": "1 2 3"},
    {"role": "user", "content": "Reverse: a b"},
    {"role": "assistant", "content": "b a"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from mlxsft.model.loading import load_tokenizer

    return load_tokenizer(str(tiny_llama))


def _template(tmp_path, source, tokenizer):
    path = tmp_path / "t.jinja"
    path.write_text(source)
    return resolve_template(str(path), tokenizer)


def test_strip_marks_exact():
    text, spans = strip_marks(f"ab{OPEN}cd{CLOSE}e{OPEN}{CLOSE}f{OPEN}g{CLOSE}")
    assert (text, spans) == ("abcdefg", [(2, 4), (6, 7)])
    assert has_generation_tags("x{%- generation -%}y{% endgeneration %}")
    assert not has_generation_tags("{{ generation }}")


def test_renders_like_transformers(tokenizer, tmp_path):
    tpl = _template(tmp_path, TAGGED, tokenizer)
    for gen in (False, True):
        msgs = CHAT[:-1] if gen else CHAT
        ours = tpl.render(msgs, add_generation_prompt=gen)
        theirs = tokenizer.apply_chat_template(
            msgs, chat_template=TAGGED, tokenize=False, add_generation_prompt=gen
        )
        assert ours == theirs and OPEN not in ours


def _example() -> Example:
    return Example([Message(m["role"], m["content"]) for m in CHAT], "chat", "f:1")


def test_mask_matches_transformers_assistant_mask(tokenizer, tmp_path):
    tpl = _template(tmp_path, TAGGED, tokenizer)
    enc = Renderer(tokenizer, tpl).render(_example(), "responses")
    assert isinstance(enc, Encoded) and not enc.generation_disagrees
    out = tokenizer.apply_chat_template(
        CHAT,
        chat_template=TAGGED,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert enc.input_ids.tolist() == list(out["input_ids"])
    np.testing.assert_array_equal(enc.loss_mask, np.asarray(out["assistant_masks"]))


def test_disagreeing_tags_are_used_and_reported(tokenizer, tmp_path):
    wide = Renderer(tokenizer, _template(tmp_path, TAGGED, tokenizer)).render(_example())
    narrow = Renderer(tokenizer, _template(tmp_path, NARROW, tokenizer)).render(_example())
    assert narrow.generation_disagrees and not wide.generation_disagrees
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained = narrow.input_ids[narrow.loss_mask == 1].tolist()
    assert end not in trained  # the tags, not the prefix method, decide
    assert end in wide.input_ids[wide.loss_mask == 1].tolist()
    from mlxsft.data.stats import compute_stats

    assert compute_stats([narrow, wide], [], batch_size=2).n_generation_disagrees == 1
