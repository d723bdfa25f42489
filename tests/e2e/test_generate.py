"""`mlxsft generate`: greedy parity with mlx_lm.generate, prompts tokenized as training encodes them,
stop at end-of-turn, sampling flags, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxsft.config import SamplingParams
from mlxsft.data.encode import encode_example
from mlxsft.data.formats import read_conversation
from mlxsft.data.types import Example, Message
from mlxsft.generate import Generator

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short poem about the sea."},
]


@pytest.fixture(scope="module")
def llama_gen(tiny_llama: Path) -> Generator:
    return Generator.load(str(tiny_llama))


def _mlx_lm_greedy(path: Path, ids: list[int], max_tokens: int, **kw) -> tuple[str, list[int]]:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    text, tokens = "", []
    for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=max_tokens, **kw):
        text += r.text
        if r.finish_reason != "stop":
            tokens.append(r.token)
    return text, tokens


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2", "tiny_llama_base"])
def test_greedy_equals_mlx_lm_generate(arch: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(arch)
    gen = Generator.load(str(path))
    ids = gen.prompt_ids(MESSAGES)
    out = gen.generate(ids, SamplingParams(max_tokens=24))
    text, tokens = _mlx_lm_greedy(path, ids, 24)
    assert out.tokens == tokens
    assert out.text == text
    assert len(out.tokens) > 0


def test_repetition_penalty_equals_mlx_lm(tiny_llama: Path, llama_gen: Generator) -> None:
    from mlx_lm.sample_utils import make_logits_processors

    ids = llama_gen.prompt_ids(MESSAGES)
    params = SamplingParams(max_tokens=20, repetition_penalty=1.5)
    out = llama_gen.generate(ids, params)
    procs = make_logits_processors(repetition_penalty=1.5, repetition_context_size=20)
    text, tokens = _mlx_lm_greedy(tiny_llama, ids, 20, logits_processors=procs)
    assert out.tokens == tokens
    assert out.tokens != llama_gen.generate(ids, SamplingParams(max_tokens=20)).tokens


def test_prompt_ids_are_the_training_encoding(llama_gen: Generator) -> None:
    example = Example(
        [Message(m["role"], m["content"]) for m in MESSAGES] + [Message("assistant", "A reply.")],
        "chat",
        "t:1",
    )
    encoded = encode_example(example, llama_gen.tokenizer, llama_gen.template)
    full = encoded.input_ids.tolist()
    prompt = llama_gen.prompt_ids(MESSAGES)
    assert full == llama_gen.renderer.conversation_ids(
        [m.to_template_dict() for m in example.messages]
    )
    assert full[: len(prompt)] == prompt  # chatml: the prompt is a token-prefix of the training row
    assert encoded.loss_mask[: len(prompt)].sum() == 0 and encoded.loss_mask[len(prompt)] == 1
    # The tokenizer's own template writes no BOS, so none is added: as apply_chat_template does.
    hf = llama_gen.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert prompt == list(hf["input_ids"] if hasattr(hf, "keys") else hf)
    assert llama_gen.tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def test_base_model_uses_alpaca_with_bos(tiny_llama_base: Path) -> None:
    gen = Generator.load(str(tiny_llama_base))
    assert gen.template.name == "alpaca"
    ids = gen.prompt_ids([{"role": "user", "content": "Say hi."}])
    assert ids[0] == 1 and ids.count(1) == 1  # one BOS, added like training does
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert gen.tokenizer.decode(ids[1:]) == expected
    assert gen.stop_ids == {2}  # alpaca turns end with EOS


def test_stop_ids_include_the_trained_end_of_turn(llama_gen: Generator) -> None:
    im_end = llama_gen.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert llama_gen.stop_ids == {2, im_end}


def test_stops_at_a_stop_token(tiny_llama: Path) -> None:
    gen = Generator.load(str(tiny_llama))
    ids = gen.prompt_ids(MESSAGES)
    free = gen.generate(ids, SamplingParams(max_tokens=8))
    gen.stop_ids = gen.stop_ids | {free.tokens[3]}
    out = gen.generate(ids, SamplingParams(max_tokens=8))
    first = free.tokens.index(free.tokens[3])
    assert out.tokens == free.tokens[:first]
    assert (out.finish_reason, out.stop_token) == ("stop", free.tokens[3])
    assert out.text == gen.tokenizer.decode(free.tokens[:first])


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama_gen: Generator) -> None:
    ids = llama_gen.prompt_ids(MESSAGES)
    greedy = llama_gen.generate(ids, SamplingParams(max_tokens=16)).tokens
    a = llama_gen.generate(ids, SamplingParams(temp=1.5, seed=3, max_tokens=16)).tokens
    b = llama_gen.generate(ids, SamplingParams(temp=1.5, seed=3, max_tokens=16)).tokens
    c = llama_gen.generate(ids, SamplingParams(temp=1.5, seed=4, max_tokens=16)).tokens
    k1 = llama_gen.generate(ids, SamplingParams(temp=1.5, top_k=1, seed=5, max_tokens=16)).tokens
    assert a == b and a != c and a != greedy
    assert k1 == greedy


def test_params_validation_and_updates() -> None:
    p = SamplingParams().with_updates(["temp=0.7", "top-k=5", "seed=none", "max_tokens=9"])
    assert (p.temp, p.top_k, p.seed, p.max_tokens) == (0.7, 5, None, 9)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="cannot set 'bogus=1'"):
        p.with_updates(["bogus=1"])
    with pytest.raises(ValueError, match="not a number"):
        p.with_updates(["temp=hot"])


def test_read_messages(tmp_path: Path) -> None:
    row = {"messages": [{"role": "system", "content": "S"}, {"from": "human", "value": "Q"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    (tmp_path / "m.json").write_text(json.dumps(row["messages"]))
    want = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    for name in ("m.jsonl", "m.json"):
        got = read_conversation(str(tmp_path / name)).messages
        assert [m.to_template_dict() for m in got] == want
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "alien", "content": "x"}]}')
    with pytest.raises(ValueError, match=r"bad.json:1: messages\[0\]: unknown role 'alien'"):
        read_conversation(str(tmp_path / "bad.json"))


def test_cli_generate_messages_and_errors(tiny_llama: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mlxsft.cli import main

    file = tmp_path / "m.json"
    file.write_text(json.dumps({"messages": MESSAGES}))
    runner = CliRunner()
    args = ["generate", "-m", str(tiny_llama), "--max-tokens", "12"]
    res = runner.invoke(main, [*args, "--messages", str(file), "--quiet"])
    assert res.exit_code == 0, res.output
    gen = Generator.load(str(tiny_llama))
    expected = gen.generate(gen.prompt_ids(MESSAGES), SamplingParams(max_tokens=12))
    assert res.stdout == expected.text + "\n"
    cut = "[cut at --max-tokens 12: the reply may be incomplete]" in res.stderr
    assert cut == (expected.finish_reason == "length")
    res = runner.invoke(main, [*args, "--messages", str(file), "-p", "x"])
    assert res.exit_code == 2 and "exactly one of --prompt and --messages" in res.stderr
    res = runner.invoke(main, [*args, "-p", "x", "--template", "nope"])
    assert res.exit_code == 2 and "unknown template 'nope'" in res.stderr


def test_cli_stories260k_raw_continuation(shared_fixtures: Path) -> None:
    from click.testing import CliRunner

    from mlxsft.cli import main

    model = shared_fixtures / "models" / "stories260K-hf"
    if not model.is_dir():
        pytest.skip("stories260K-hf fixture absent")
    args = ["generate", "-m", str(model), "--raw", "-p", "Once upon a time", "--max-tokens", "20"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(", there was a little girl named Lily. She loved to play")
    assert "generation: 20 tokens" in res.stderr and "tokens/s" in res.stderr
    assert "[cut at --max-tokens 20: the reply may be incomplete]" in res.stderr
    text, _ = _mlx_lm_greedy(model, [1, 403, 407, 261, 378], 20)  # BOS + "Once upon a time"
    assert res.stdout == text + "\n"


def _random_adapter(path: Path, out: Path) -> Path:
    """An mlx-lm LoRA adapter dir with non-zero lora_b (so it changes the output)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlxsft import _mlxlm

    model, _ = _mlxlm.load_model(path)
    model.freeze()
    lora = {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, 2, lora)
    rng = np.random.default_rng(0)
    weights = {
        k: mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.2)
        for k, v in tree_flatten(model.trainable_parameters())
    }
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_adapter_greedy_equals_mlx_lm(tiny_llama: Path, tmp_path: Path) -> None:
    adapter = _random_adapter(tiny_llama, tmp_path / "adapter")
    gen = Generator.load(str(tiny_llama), adapter=str(adapter))
    ids = gen.prompt_ids(MESSAGES)
    out = gen.generate(ids, SamplingParams(max_tokens=16))
    _, tokens = _mlx_lm_greedy_adapter(tiny_llama, adapter, ids, 16)
    assert out.tokens == tokens
    base = Generator.load(str(tiny_llama)).generate(ids, SamplingParams(max_tokens=16))
    assert out.tokens != base.tokens
    # The same adapter in PEFT format (export.peft) gives the same greedy reply.
    from mlxsft.export.peft import export_peft

    peft_dir = export_peft(adapter, tmp_path / "peft", base_model=str(tiny_llama))
    peft_gen = Generator.load(str(tiny_llama), adapter=str(peft_dir))
    assert peft_gen.generate(ids, SamplingParams(max_tokens=16)).tokens == out.tokens


def _mlx_lm_greedy_adapter(path: Path, adapter: Path, ids: list[int], n: int):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path), adapter_path=str(adapter))
    responses = list(mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=n))
    return "".join(r.text for r in responses), [
        r.token for r in responses if r.finish_reason != "stop"
    ]


def test_ctrl_c_ends_the_reply_early(llama_gen: Generator) -> None:
    ids = llama_gen.prompt_ids(MESSAGES)
    full = llama_gen.generate(ids, SamplingParams(max_tokens=16))
    seen: list[str] = []

    def interrupt_after_3(segment: str) -> None:
        seen.append(segment)
        if len(seen) == 3:
            raise KeyboardInterrupt

    out = llama_gen.generate(ids, SamplingParams(max_tokens=16), on_text=interrupt_after_3)
    assert out.finish_reason == "interrupted"
    assert 3 <= len(out.tokens) < len(full.tokens)
    assert out.tokens == full.tokens[: len(out.tokens)]


def test_adapter_run_template_is_used(tiny_llama_base: Path, tmp_path: Path) -> None:
    adapter = _random_adapter(tiny_llama_base, tmp_path / "run")
    assert Generator.load(str(tiny_llama_base), adapter=str(adapter)).template.name == "alpaca"
    (adapter / "config.yaml").write_text("template: chatml\n")
    gen = Generator.load(str(tiny_llama_base), adapter=str(adapter))
    assert gen.template.name == "chatml"
    assert gen.decode(gen.prompt_ids([{"role": "user", "content": "Hi"}])) == (
        "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    explicit = Generator.load(str(tiny_llama_base), adapter=str(adapter), template="alpaca")
    assert explicit.template.name == "alpaca"


@pytest.mark.parametrize(
    ("arch", "template", "end"),
    [
        ("tiny_gemma", "auto", "<end_of_turn>"),
        ("tiny_phi3", "auto", "<|end|>"),
        ("tiny_llama_base", "llama3", "<|eot_id|>"),
        ("tiny_llama_base", "mistral", "</s>"),
    ],
)
def test_end_of_turn_per_template(
    arch: str, template: str, end: str, request: pytest.FixtureRequest
) -> None:
    from mlxsft.data.templates import resolve_template
    from mlxsft.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(request.getfixturevalue(arch)))
    gen = Generator(None, tokenizer, resolve_template(template, tokenizer))
    assert gen.stop_ids == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end)}


@pytest.mark.parametrize(
    ("name", "stops", "prompt_end"),
    [
        ("mistral-7b-instruct-v0.3", {"</s>"}, "Hi[/INST]"),
        ("phi-3-mini-128k-instruct", {"<|endoftext|>", "<|end|>"}, "<|end|><|assistant|>"),
    ],
)
def test_real_tokenizers_stop_at_their_end_of_turn(
    shared_fixtures: Path, name: str, stops: set[str], prompt_end: str
) -> None:
    """(qwen2.5's fixture has no tokenizer.json; converting it takes ~8 s, so it is left out.)"""
    from mlxsft.data.templates import resolve_template
    from mlxsft.model.loading import load_tokenizer

    path = shared_fixtures / "tokenizers" / name
    if not path.is_dir():
        pytest.skip(f"{name} fixture absent")
    tokenizer = load_tokenizer(str(path))
    gen = Generator(None, tokenizer, resolve_template("auto", tokenizer))
    assert {tokenizer.convert_ids_to_tokens(i) for i in gen.stop_ids} == stops
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    ids = gen.prompt_ids(messages)
    assert tokenizer.decode(ids).endswith(prompt_end)
    hf = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == list(hf["input_ids"] if hasattr(hf, "keys") else hf)
