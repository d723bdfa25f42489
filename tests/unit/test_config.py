"""Run config: defaults, YAML file, unknown keys, flag precedence, schedules."""

from __future__ import annotations

import pytest
import yaml

from mlxsft import rundir
from mlxsft.config import TrainConfig, load_config, resolve
from mlxsft.errors import UserError


def test_unknown_key_rejected_with_valid_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nlearning_rte: 0.1\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    text = str(err.value)
    assert "unknown config key 'learning_rte'" in text
    assert str(path) in text
    assert "learning_rate" in text and "max_seq_len" in text  # the valid keys are listed


def test_flags_override_file_and_file_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nlearning_rate: 1e-3\nrank: 4\nlora_alpha: 32\niters: 50\n")
    cfg = resolve({"rank": 16, "batch_size": None, "epochs": 2}, path)
    assert cfg.learning_rate == 0.001  # from the file ("1e-3" is a YAML string)
    assert cfg.rank == 16  # flag wins
    assert cfg.alpha == 32.0  # alias from the file
    assert cfg.batch_size == TrainConfig.batch_size  # unset flag: default
    assert (cfg.epochs, cfg.iters) == (2, None)  # --epochs replaces the file's iters


def test_mlx_lm_style_lora_parameters_block(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: m\nlora_parameters:\n  rank: 4\n  dropout: 0.1\n  keys: [self_attn.q_proj]\n"
    )
    expected = {"model": "m", "rank": 4, "dropout": 0.1, "target_modules": "q_proj"}
    assert load_config(path) == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optimizer": "lion"}, "invalid optimizer 'lion'"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"epochs": 1, "iters": 3}, "both epochs and iters"),
        ({"batch_size": 4, "grad_accum": 3}, "not a multiple of grad_accum"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"rank": "eight"}, "rank: expected int"),
    ],
)
def test_invalid_values(values, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        resolve(values)


def test_resolved_config_round_trips(tmp_path):
    flags = {"model": "m", "data": "d", "lr": 0.5, "target_modules": "q_proj,v_proj"}
    cfg = resolve({**flags, "resume": "auto"})
    rundir.write_config(tmp_path, cfg.to_dict())
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert set(saved) == set(TrainConfig().to_dict()) - {"resume"}  # re-running never resumes
    assert resolve({}, tmp_path / "config.yaml") == resolve(flags)


def test_schedules_with_warmup():
    import mlx.core as mx

    from mlxsft.train.schedule import build_schedule, warmup_steps

    def lrs(kind: str) -> list[float]:
        f = build_schedule(TrainConfig(learning_rate=1.0, lr_schedule=kind, warmup=3), 10)
        return [round(f(mx.array(i)).item(), 4) for i in range(10)]

    assert lrs("constant") == [0.25, 0.5, 0.75] + [1.0] * 7
    assert lrs("linear") == [0.25, 0.5, 0.75, 1.0, 0.8571, 0.7143, 0.5714, 0.4286, 0.2857, 0.1429]
    cos = lrs("cosine")
    assert cos[:4] == [0.25, 0.5, 0.75, 1.0] and cos[-1] == 0.0495
    assert warmup_steps(0.1, 200) == 20 and warmup_steps(5, 200) == 5
