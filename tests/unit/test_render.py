"""The one conversation renderer (`mlxsft.data.render`): the --train-on policy, prompt ids and stop
tokens for hand-built cases, the prompt being exactly the untrained head of the training encoding,
and prompt ids equal to `apply_chat_template(..., add_generation_prompt=True)` for real tokenizers
(../shared fixtures, skipped when absent). Exact training encodings are in test_encode.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_tokenizer import build_tokenizer, tokens

from mlxsft.data.formats import normalise
from mlxsft.data.render import Renderer, turn_policy
from mlxsft.data.templates import BUILTIN, ChatTemplate, resolve_template
from mlxsft.data.types import Encoded, Example, Message
from mlxsft.errors import UserError

TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": "Hey"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
PROMPTS = {  # the prompt for TURNS[:4], tokens joined by "·"
    "chatml": "<s>·<|im_start|>·system·\n·Be· ·brief·.·<|im_end|>·\n·<|im_start|>·user·\n·Hi·.·"
    "<|im_end|>·\n·<|im_start|>·assistant·\n·Hey·<|im_end|>·\n·<|im_start|>·user·\n·Thanks·!·"
    "<|im_end|>·\n·<|im_start|>·assistant·\n",
    "llama3": "<s>·<|start_header_id|>·system·<|end_header_id|>·\n\n·Be· ·brief·.·<|eot_id|>·"
    "<|start_header_id|>·user·<|end_header_id|>·\n\n·Hi·.·<|eot_id|>·<|start_header_id|>·"
    "assistant·<|end_header_id|>·\n\n·Hey·<|eot_id|>·<|start_header_id|>·user·<|end_header_id|>·"
    "\n\n·Thanks·!·<|eot_id|>·<|start_header_id|>·assistant·<|end_header_id|>·\n\n",
    "mistral": "<s>·[·INST·]· ·Be· ·brief·.·\n\n·Hi·.· ·[·/·INST·]· ·Hey·</s>·[·INST·]· ·Thanks·"
    "!· ·[·/·INST·]",
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>",
               "phi3": "<|end|>", "mistral": "</s>", "alpaca": "</s>"}  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["Be brief. Hi. Hey Thanks! You are welcome."])


def test_turn_policy_decides_train_on():
    msgs = [Message("user", "a"), Message("assistant", "b"), Message("user", "c"),
            Message("assistant", "d", train=False), Message("user", "e"),
            Message("assistant", "f")]  # fmt: skip
    ex = Example(msgs, "chat", "t:1")
    assert turn_policy(ex, "responses") == {1: True, 3: False, 5: True}
    assert turn_policy(ex, "all") == {1: True, 3: False, 5: True}
    assert turn_policy(ex, "last") == {3: False, 5: True}
    msgs[5].train = False
    assert turn_policy(ex, "last") == {3: False, 5: False}
    with pytest.raises(ValueError, match="train_on must be one of"):
        turn_policy(ex, "everything")


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_prompt_ids_exact(tok, name):
    r = Renderer(tok, resolve_template(name, tok))
    assert "·".join(tokens(tok, r.prompt_ids(TURNS[:4]))) == PROMPTS[name]


@pytest.mark.parametrize("name", BUILTIN)
def test_prompt_is_the_untrained_head_of_the_training_row(tok, name):
    """For every built-in template the prompt ids are a token prefix of the training encoding,
    and its first trained token is the first one the model generates."""
    r = Renderer(tok, resolve_template(name, tok))
    example = normalise({"messages": TURNS}, "chat", "t:1")
    enc = r.render(example, "last")
    assert isinstance(enc, Encoded)
    prompt = r.prompt_ids(TURNS[:4])
    assert enc.input_ids[: len(prompt)].tolist() == prompt
    assert enc.loss_mask[: len(prompt)].sum() == 0 and enc.loss_mask[len(prompt)] == 1
    assert enc.input_ids.tolist() == r.conversation_ids(example.messages)
    trained = [t for t, m in zip(tokens(tok, enc.input_ids), enc.loss_mask, strict=True) if m]
    assert trained[-1] == END_OF_TURN[name] and "".join(trained[:-1]).strip() == "You are welcome."


@pytest.mark.parametrize("name", BUILTIN)
def test_stop_ids_are_eos_and_the_end_of_turn(tok, name):
    r = Renderer(tok, resolve_template(name, tok))
    want = {tok.eos_token_id, tok.convert_tokens_to_ids(END_OF_TURN[name])}
    assert r.stop_ids == want
    assert Renderer(tok, r.template, eos_token_id=[7, 8]).stop_ids == want | {7, 8}
    assert Renderer(tok, None, eos_token_id=9).stop_ids == {tok.eos_token_id, 9}


def test_one_bos_rule(tok):
    no_bos = build_tokenizer(["Hi."], add_bos=False)
    assert tokens(tok, Renderer(tok, None).text_ids("Hi.")) == ["<s>", "Hi", "."]
    assert tokens(tok, Renderer(tok, None).text_ids("<s>Hi.")) == ["<s>", "Hi", "."]
    assert tokens(no_bos, Renderer(no_bos, None).text_ids("Hi.")) == ["Hi", "."]
    # a template that is not built in writes its own BOS (or none): none is added
    own = Renderer(tok, ChatTemplate("own", "{{ 'Hey' }}", builtin=False))
    assert tokens(tok, own.prompt_ids(TURNS[:2])) == ["Hey"]
    with pytest.raises(UserError, match="no chat template in use"):
        Renderer(tok, None).prompt_ids(TURNS[:2])


@pytest.mark.parametrize(
    ("path", "template", "stops"),
    [
        ("tokenizers/mistral-7b-instruct-v0.3", "auto", {"</s>"}),
        ("tokenizers/phi-3-mini-128k-instruct", "auto", {"<|end|>", "<|endoftext|>"}),
        ("models/smollm2-135m-instruct-mlx-q4", "auto", {"<|im_end|>"}),
        ("tokenizers/llama-2", "alpaca", {"</s>"}),
    ],
)
def test_real_tokenizers_match_apply_chat_template(shared_fixtures: Path, path, template, stops):
    from transformers import AutoTokenizer

    if not (shared_fixtures / path).is_dir():
        pytest.skip(f"{path} fixture absent")
    tok = AutoTokenizer.from_pretrained(str(shared_fixtures / path))
    tpl = resolve_template(template, tok)
    r = Renderer(tok, tpl)
    msgs = TURNS[1:4] if "mistral" in path else TURNS[:4]  # Mistral v0.3 takes no system turn
    want = tok.apply_chat_template(
        msgs, chat_template=tpl.source, add_generation_prompt=True, tokenize=True
    )
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    if tpl.builtin:  # built-ins write no BOS; the renderer adds the tokenizer's, as training does
        want = [tok.bos_token_id, *want]
    assert r.prompt_ids(msgs) == want
    assert {tok.convert_ids_to_tokens(i) for i in r.stop_ids} == stops
    # in the finished conversation, the reply is followed by a stop token
    full = r.conversation_ids([*msgs, {"role": "assistant", "content": "Fine."}])
    assert full[: len(want)] == want
    reply = full[len(want) :]
    end = next(k for k, t in enumerate(reply) if t in r.stop_ids)
    assert tok.decode(reply[:end]).strip() == "Fine."
