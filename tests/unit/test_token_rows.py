"""Trainable token rows (`--train-tokens`): exact forward on hand-set deltas, training changes only
the chosen rows, fused == base + adapter, exact resume, PEFT round trip, the untrained-row check
and the warning."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxsft import _mlxlm
from mlxsft.config import resolve
from mlxsft.model import token_rows
from mlxsft.model.loading import load
from mlxsft.train.loop import train

IDS = [1, 40, 41, 300, 7, 99, 12]
ROWS = [
    ("Reverse the letters: a b c", "c b a"),
    ("Sort the numbers: 3 1 2", "1 2 3"),
    ("Uppercase: x y", "X Y"),
    ("Largest number: 7 2 9", "9"),
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in ROWS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model: Path, data: Path, out: Path, **kw):
    base = dict(
        model=str(model), data=str(data), output=str(out), iters=4, batch_size=2,
        max_seq_len=64, learning_rate=1e-2, save_every=2, eval_every=0, steps_per_report=1,
        seed=1, train_tokens="<|im_end|>,<|im_start|>",
    )  # fmt: skip
    base.update(kw)
    return resolve(base)


def _dense(module) -> np.ndarray:
    return np.array(_mlxlm.dense_weight(module).astype(mx.float32))


def test_forward_with_hand_set_deltas_is_exact(tiny_llama):
    from mlx.utils import tree_flatten

    model = load(str(tiny_llama)).model  # untied
    model.freeze()  # as apply_adapters leaves it
    w_embed, w_head = _dense(model.model.embed_tokens), _dense(model.lm_head)
    entry = token_rows.apply_token_rows(model, [41, 7])
    assert entry == {"indices": [7, 41], "modules": ["embedding", "head"], "form": "delta"}
    d_embed = np.arange(2 * 64, dtype=np.float32).reshape(2, 64) / 100
    d_head = -d_embed
    model.model.embed_tokens.delta = mx.array(d_embed)
    model.lm_head.delta = mx.array(d_head)
    got = np.array(model.model.embed_tokens(mx.array([[1, 7, 41, 12]])))[0]
    want = w_embed[[1, 7, 41, 12]] + np.stack(
        [0 * d_embed[0], d_embed[0], d_embed[1], 0 * d_embed[0]]
    )
    np.testing.assert_array_equal(got, want)
    h = mx.array(np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32))
    w_head_new = w_head.copy()
    w_head_new[[7, 41]] += d_head
    np.testing.assert_allclose(np.array(model.lm_head(h)), np.array(h) @ w_head_new.T, atol=1e-5)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert set(trainable) == {"model.embed_tokens.delta", "lm_head.delta"}


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_qwen2", "tiny_llama_q4"])
def test_training_changes_only_the_chosen_rows(base, request, data_file, tmp_path):
    """Untied, tied and 4-bit (QLoRA) bases: after training and fusing, every other row of the
    embedding and the head is bit-identical to the base; the chosen rows moved."""
    from mlxsft.model import lora

    model_dir = request.getfixturevalue(base)
    out = tmp_path / "run"
    train(
        _cfg(model_dir, data_file, out, fine_tune_type="dora" if base == "tiny_qwen2" else "lora")
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    tok = load(str(model_dir)).tokenizer
    chosen = sorted(tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]))
    assert cfg["trainable_tokens"]["indices"] == chosen
    base_model = load(str(model_dir)).model
    fused = lora.fuse_adapters(load(str(model_dir), adapter=str(out)).model, dequantize=True)
    others = np.setdiff1d(np.arange(_dense(base_model.model.embed_tokens).shape[0]), chosen)
    pairs = [(base_model.model.embed_tokens, fused.model.embed_tokens)]
    if "lm_head" in base_model:
        pairs.append((base_model.lm_head, fused.lm_head))
    for before, after in pairs:
        b, a = _dense(before), _dense(after)
        np.testing.assert_array_equal(a[others], b[others])
        assert (np.abs(a[chosen] - b[chosen]).max(axis=1) > 1e-4).all()


def test_fused_equals_base_plus_adapter(tiny_llama, data_file, tmp_path):
    from mlxsft.export.fuse import fuse_model

    out = tmp_path / "run"
    train(_cfg(tiny_llama, data_file, out))
    report = fuse_model(str(tiny_llama), out, tmp_path / "fused", echo=lambda *_: None)
    assert report.max_abs_diff < 1e-4
    assert report.kl_adapter_base > 1e-4  # the adapter (token rows included) did something
    from _export_utils import adapted_logits

    fused_logits = adapted_logits(tmp_path / "fused", None, IDS)
    np.testing.assert_allclose(fused_logits, adapted_logits(tiny_llama, out, IDS), atol=1e-4)


def test_resume_with_token_rows_is_exact(tiny_llama, data_file, tmp_path):
    straight = tmp_path / "straight"
    train(_cfg(tiny_llama, data_file, straight))
    resumed = tmp_path / "resumed"
    train(_cfg(tiny_llama, data_file, resumed, resume=str(straight / "checkpoints/step-0000002")))
    from mlxsft.model.lora import read_adapter_weights

    a, b = read_adapter_weights(straight), read_adapter_weights(resumed)
    assert set(a) == set(b) and "lm_head.delta" in a
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) <= 1e-6


def test_mlx_lm_loads_the_lora_part(tiny_llama, data_file, tmp_path):
    """mlx-lm loads the LoRA part (the token rows live in their own file)."""
    from mlx_lm import load as mlx_lm_load

    out = tmp_path / "run"
    train(_cfg(tiny_llama, data_file, out))
    model, _ = mlx_lm_load(str(tiny_llama), adapter_path=str(out))
    ours = load(str(tiny_llama), adapter=str(out)).model
    ours.model.embed_tokens.delta = mx.zeros_like(ours.model.embed_tokens.delta)
    ours.lm_head.delta = mx.zeros_like(ours.lm_head.delta)
    x = mx.array([IDS])
    np.testing.assert_allclose(np.array(model(x)), np.array(ours(x)), atol=1e-5)


def _token_adapter(model_dir: Path, out: Path, ids: list[int]) -> Path:
    """A random LoRA adapter plus random token-row deltas on `ids`."""
    from _export_utils import write_random_adapter

    from mlxsft.model import lora

    write_random_adapter(model_dir, out)
    model = load(str(model_dir), adapter=str(out)).model
    config = lora.read_adapter_config(out)
    config["trainable_tokens"] = token_rows.apply_token_rows(model, ids)
    rng = np.random.default_rng(1)
    for w in (model.model.embed_tokens, model.get("lm_head")):
        if w is not None:
            w.delta = mx.array(rng.standard_normal(w.delta.shape).astype(np.float32))
    return lora.save_adapters(model, out, config)


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_qwen2"])
def test_peft_round_trip_with_token_rows(base, request, tmp_path):
    from _export_utils import adapted_logits

    from mlxsft.export.peft import export_peft

    model_dir = request.getfixturevalue(base)
    adapter = _token_adapter(model_dir, tmp_path / "a", [3, 41])
    peft_dir = export_peft(adapter, tmp_path / "peft", base_model=str(model_dir))
    peft_cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    tied = base == "tiny_qwen2"
    want = [3, 41] if tied else {"embed_tokens": [3, 41], "lm_head": [3, 41]}
    assert peft_cfg["trainable_token_indices"] == want
    ref = adapted_logits(model_dir, adapter, IDS)
    back = adapted_logits(model_dir, peft_dir, IDS)  # PEFT dir converted on load
    np.testing.assert_allclose(back, ref, atol=1e-5)


@pytest.mark.optional
@pytest.mark.parametrize("base", ["tiny_llama", "tiny_qwen2"])
def test_hf_peft_reproduces_token_rows(base, request, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from _export_utils import adapted_logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlxsft.export.peft import export_peft

    model_dir = request.getfixturevalue(base)
    adapter = _token_adapter(model_dir, tmp_path / "a", [3, 41])
    peft_dir = export_peft(adapter, tmp_path / "peft", base_model=str(model_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, str(peft_dir)).eval()
    ids = IDS[:3] + [41, 3]
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, adapted_logits(model_dir, adapter, ids), atol=1e-4)


def test_collapsed_rows_look_untrained_and_auto_picks_them(tiny_llama, data_file, tmp_path):
    """Rows that share one vector with >= 2 other rows (as never-seen tokens of a pretrained model
    do) look untrained; random rows do not. `auto` trains them; `none` warns."""
    import shutil

    from mlx.utils import tree_flatten

    src = load(str(tiny_llama))
    end = src.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model_dir = tmp_path / "collapsed"
    shutil.copytree(tiny_llama, model_dir)
    weights = dict(tree_flatten(src.model.parameters()))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        w = np.array(weights[key])
        w[[end, 500, 501, 502]] = w[500]
        weights[key] = mx.array(w)
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights)

    checks = token_rows.check_rows(load(str(model_dir)).model, [end, 5], src.tokenizer)
    assert [(c.token_id, c.twins, c.untrained) for c in checks if c.where == "embedding"] == [
        (end, 3, True),
        (5, 0, False),
    ]
    lines: list[str] = []

    class Stream:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

        def isatty(self):
            return False

    train(
        _cfg(model_dir, data_file, tmp_path / "none", train_tokens="none", iters=1), stream=Stream()
    )
    warning = [s for s in "".join(lines).splitlines() if s.startswith("warning: '<|im_end|>'")]
    assert len(warning) == 1 and "--train-tokens auto" in warning[0]
    lines.clear()
    train(
        _cfg(model_dir, data_file, tmp_path / "auto", train_tokens="auto", iters=1), stream=Stream()
    )
    cfg = json.loads((tmp_path / "auto" / "adapter_config.json").read_text())
    assert cfg["trainable_tokens"]["indices"] == [end]
    assert "token rows (auto): training <|im_end|>" in "".join(lines)
    assert "warning: '<|im_end|>'" not in "".join(lines)


def test_bad_token_spec_is_a_user_error(tiny_llama, data_file, tmp_path):
    from mlxsft.errors import UserError

    with pytest.raises(UserError, match="not a token"):
        train(_cfg(tiny_llama, data_file, tmp_path / "x", train_tokens="<|nope|>"))
    with pytest.raises(UserError, match="LoRA/DoRA"):
        train(_cfg(tiny_llama, data_file, tmp_path / "y", fine_tune_type="full"))


def test_add_chat_tokens_end_to_end(tiny_llama_base, data_file, tmp_path):
    """A base model without a chat template: the ChatML markers are added and trained; the
    adapter dir carries the tokenizer; load/generate/fuse use it."""
    from mlxsft.export.fuse import fuse_model
    from mlxsft.generate import Generator

    base = load(str(tiny_llama_base))
    rows_before = token_rows.n_rows(base.model)
    out = tmp_path / "run"
    train(_cfg(tiny_llama_base, data_file, out, train_tokens="none", add_chat_tokens=True))
    tok = load(str(tiny_llama_base), adapter=str(out)).tokenizer
    ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert None not in ids and ids[0] != tok.unk_token_id
    entry = json.loads((out / "adapter_config.json").read_text())["trainable_tokens"]
    assert entry["indices"] == sorted(ids) and entry["vocab_size"] == max(rows_before, max(ids) + 1)
    assert "template: chatml" in (out / "config.yaml").read_text()

    gen = Generator.load(str(tiny_llama_base), adapter=str(out))
    assert ids[1] in gen.stop_ids
    prompt = gen.prompt_ids([{"role": "user", "content": "Uppercase: x y"}])
    assert ids[0] in prompt  # `<|im_start|>` is one token, not split into pieces

    from mlxsft.train.evaluate import evaluate_model

    ev = evaluate_model(
        resolve(dict(model=str(tiny_llama_base), data=str(data_file), adapter=str(out),
                     template="chatml", max_seq_len=64))
    )  # fmt: skip
    assert ev["examples"] == len(ROWS) and ev["loss"] < 20

    report = fuse_model(str(tiny_llama_base), out, tmp_path / "fused", echo=lambda *_: None)
    assert report.max_abs_diff < 1e-4
    fused = load(str(tmp_path / "fused"))
    assert fused.tokenizer.convert_tokens_to_ids("<|im_end|>") == ids[1]
    assert token_rows.n_rows(fused.model) == entry["vocab_size"]

    from mlxsft.export.peft import export_peft

    peft_dir = export_peft(out, tmp_path / "peft", base_model=str(tiny_llama_base))
    assert (peft_dir / "tokenizer.json").is_file()
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == sorted(ids)


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_llama_q4"])
def test_resize_keeps_rows_and_adds_the_mean_row(base, request):
    model = load(str(request.getfixturevalue(base))).model
    before = {m: _dense(token_rows._matrix(model, m)) for m in ("embedding", "head")}
    rows = before["embedding"].shape[0]
    token_rows.resize_vocab(model, rows + 3)
    for m, old in before.items():
        new = _dense(token_rows._matrix(model, m))
        assert new.shape == (rows + 3, old.shape[1])
        np.testing.assert_array_equal(new[:rows], old)
        mean = old.mean(axis=0)
        step = (mean.max() - mean.min()) / 15  # one 4-bit step over the row's range
        tol = step if base == "tiny_llama_q4" else 1e-6
        np.testing.assert_allclose(new[rows:], np.broadcast_to(mean, (3, old.shape[1])), atol=tol)


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_qwen2"])
def test_selective_loss_equals_full_loss_with_token_rows(base, request):
    """The chunked selective loss goes through the token-row head: same sum, same delta grads."""
    import mlx.nn as nn

    from mlxsft.train.loss import full_ce, selective_ce

    model = load(str(request.getfixturevalue(base))).model
    model.freeze()
    token_rows.apply_token_rows(model, [3, 41, 7])
    rng = np.random.default_rng(0)
    for w in (model.model.embed_tokens, model.get("lm_head")):
        if w is not None and "delta" in w:
            w.delta = mx.array(rng.standard_normal(w.delta.shape).astype(np.float32))
    inputs = mx.array(rng.integers(0, 500, (2, 12)), dtype=mx.int32)
    targets = mx.array([[41, 3, 7, 41] * 3, [7] * 12], dtype=mx.int32)
    mask = mx.array(rng.integers(0, 2, (2, 12)), dtype=mx.float32)

    def grads(fn):
        return nn.value_and_grad(model, lambda m: fn(m, inputs, targets, mask))(model)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to full logits
        (a, ga), (b, gb) = grads(full_ce), grads(lambda *x: selective_ce(*x, chunk_size=5))
    assert abs(a.item() - b.item()) < 1e-3 * abs(a.item())
    from mlx.utils import tree_flatten

    fa, fb = dict(tree_flatten(ga)), dict(tree_flatten(gb))
    assert set(fa) == set(fb) and any(k.endswith("delta") for k in fa)
    for k in fa:
        np.testing.assert_allclose(np.array(fb[k]), np.array(fa[k]), atol=1e-4, rtol=1e-3)
