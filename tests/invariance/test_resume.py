"""Exact resume: train 2k steps straight == train k, stop, resume, train k more (within 1e-6),
with LoRA dropout on (so the MLX RNG key must be restored), a warmup + cosine schedule (its
position must be restored) and epochs shorter than k (the data cursor must be restored)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlxsft.config import resolve
from mlxsft.errors import UserError
from mlxsft.train.loop import train

ROWS = [
    ("Reverse the letters: a b c", "c b a"),
    ("Sort the numbers: 3 1 2", "1 2 3"),
    ("Uppercase: x y", "X Y"),
    ("How many letters? a b c d", "4"),
    ("Largest number: 7 2 9", "9"),
    ("Reverse the letters: q r", "r q"),
    ("Sort the numbers: 5 4", "4 5"),
    ("Uppercase: m n o", "M N O"),
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
        for q, a in ROWS
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(model: Path, data: Path, out: Path, **kw):
    base = dict(
        model=str(model), data=str(data), output=str(out), iters=6, batch_size=2,
        max_seq_len=128, learning_rate=1e-2, dropout=0.1, lr_schedule="cosine", warmup=2,
        save_every=3, eval_every=0, steps_per_report=1, seed=3,
    )  # fmt: skip
    base.update(kw)
    return resolve(base)


def _weights(out: Path) -> dict[str, mx.array]:
    return mx.load(str(out / "adapters.safetensors"))


def _max_diff(a: dict[str, mx.array], b: dict[str, mx.array]) -> float:
    assert set(a) == set(b)
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


class _InterruptAt:
    """A progress stream that sends this process SIGINT (a Ctrl-C) once it reports `step`."""

    def __init__(self, step: int, total: int):
        self.marker = f"step {step}/{total} "
        self.sent = False
        self.text = ""

    def write(self, text: str) -> None:
        sys.stderr.write(text)
        self.text += text
        if not self.sent and self.marker in text:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@pytest.fixture(scope="module")
def straight(tiny_llama, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    result = train(_cfg(tiny_llama, data_file, out))
    assert result.steps == 6
    assert result.n_compilations <= 4
    return out


def test_resume_from_checkpoint_dir_equals_straight(straight, tiny_llama, data_file, tmp_path):
    ckpt = tmp_path / "step-0000003"
    shutil.copytree(straight / "checkpoints" / ckpt.name, ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] >= 1  # k crosses an epoch
    # older checkpoints also hold an (unused) NumPy RNG state: they resume the same
    (ckpt / "state.json").write_text(json.dumps({**state, "np_rng": {"bit_generator": "PCG64"}}))
    out = tmp_path / "resumed"
    result = train(_cfg(tiny_llama, data_file, out, resume=str(ckpt)))
    assert result.steps == 6 and result.resumed_from == ckpt
    assert _max_diff(_weights(out), _weights(straight)) <= 1e-6
    # the updates were not trivial
    assert max(mx.abs(v).max().item() for k, v in _weights(out).items() if "lora_b" in k) > 1e-3


def test_ctrl_c_saves_then_resume_auto_equals_straight(
    straight, tiny_llama, data_file, tmp_path, capsys
):
    out = tmp_path / "run"
    stream = _InterruptAt(2, 6)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_llama, data_file, out, save_every=0), stream=stream)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    assert f"resume with: mlxsft train -c {out / 'config.yaml'} --resume auto" in stream.text
    # Ctrl-C also writes the top-level adapter of the last step (usable at once)
    interrupted = _weights(out)
    step2 = mx.load(str(out / "checkpoints" / "step-0000002" / "adapters.safetensors"))
    assert _max_diff(interrupted, step2) == 0
    # --adapter RUN_DIR without a top-level adapter: its newest checkpoint, said in one line
    from mlxsft.model.loading import load

    (out / "adapter_config.json").rename(out / "hidden.json")
    loaded = load(str(tiny_llama), adapter=str(out))
    assert "using its latest checkpoint" in capsys.readouterr().err
    assert loaded.model is not None
    (out / "hidden.json").rename(out / "adapter_config.json")
    train(_cfg(tiny_llama, data_file, out, save_every=0, resume="auto"))
    assert _max_diff(_weights(out), _weights(straight)) <= 1e-6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    straight_losses = [
        json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["loss"] for r in records] == pytest.approx(straight_losses, abs=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    tiny_llama, data_file, tmp_path, monkeypatch
):
    """NaN at step 4: the weights after step 3 made it, so step-3 is dropped and step-2 kept."""
    import mlxsft.train.step as step_mod
    from mlxsft.train.loop import TrainingDiverged

    real = step_mod.make_train_step

    def nan_at_4(*args, **kw):
        step = real(*args, **kw)
        calls = []

        def wrapped(micro):
            calls.append(1)
            loss, n = step(micro)
            return (float("nan") if len(calls) == 4 else loss), n

        wrapped.n_compilations = 0
        wrapped.last_grad_norm = None
        return wrapped

    monkeypatch.setattr(step_mod, "make_train_step", nan_at_4)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4.*step-0000002"):
        train(_cfg(tiny_llama, data_file, out, save_every=1))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [
        "step-0000001",
        "step-0000002",
    ]
    assert not (out / "adapters.safetensors").exists()


def test_resume_with_other_settings_or_data_is_refused_line_by_line(
    straight, tiny_llama, data_file, tmp_path
):
    changed = tmp_path / "train.jsonl"
    changed.write_text(data_file.read_text().replace("c b a", "a b c"))
    cfg = _cfg(tiny_llama, changed, tmp_path / "o", batch_size=4, resume=str(straight))
    with pytest.raises(UserError) as info:
        train(cfg)
    lines = str(info.value).splitlines()
    assert "2 setting(s) differ" in lines[0]
    assert lines[1] == "  batch_size: 2 in the checkpoint, 4 now"
    assert lines[2].startswith("  data_sha256: data sha256 ")
    assert not (tmp_path / "o" / "checkpoints").exists()  # nothing written
