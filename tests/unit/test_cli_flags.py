"""One flag vocabulary: every command's `--help` shows the shared flags with the same names and
aliases, and every choice list is the one in `mlxsft.config`."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from mlxsft import config as C
from mlxsft.cli import main

# flag -> the other spellings it must have wherever it appears
SHARED = {
    "--model": {"-m"},
    "--adapter": {"-a"},
    "--output": {"-o"},
    "--data": {"-d"},
    "--max-seq-len": {"--max-seq-length"},
    "--eval-every": {"--steps-per-eval"},
}
# which commands must take which shared flag
EXPECTED = {
    "--model": ["data inspect", "data validate", "train", "eval", "plan", "fuse", "export",
                "generate", "chat", "demo"],
    "--adapter": ["train", "eval", "fuse", "export", "generate", "chat"],
    "--adapter-path": ["train", "eval", "fuse", "export", "generate", "chat"],
    "--output": ["train", "fuse", "export", "demo", "report"],
    "--data": ["data inspect", "data validate", "train", "eval", "plan"],
    "--max-seq-len": ["data inspect", "train", "eval", "plan"],
    "--eval-every": ["train"],
}  # fmt: skip
CHOICES = {
    "--train-on": C.TRAIN_ON,
    "--fine-tune-type": C.FINE_TUNE_TYPES,
    "--quantize": tuple(str(b) for b in C.QUANTIZE_BITS),
    "--optimizer": C.OPTIMIZERS,
    "--lr-schedule": C.LR_SCHEDULES,
    "--loss": C.LOSS_HEADS,
    "--dtype": C.GGUF_DTYPES,
}


def all_commands() -> list[str]:
    names = []
    for name in main.list_commands(click.Context(main)):
        cmd = main.get_command(click.Context(main), name)
        if isinstance(cmd, click.Group):
            names += [f"{name} {sub}" for sub in cmd.list_commands(click.Context(cmd))]
        else:
            names.append(name)
    return names


def help_flags(command: str) -> list[set[str]]:
    """The flag spellings of each option line of `mlxsft COMMAND --help`."""
    result = CliRunner().invoke(main, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    rows = []
    for line in result.output.splitlines():
        m = re.match(r"^  (-[^ ,]+(?:, -[^ ,]+)*)", line)
        if m:
            rows.append({f.split(" /")[0] for f in m.group(1).split(", ")})
    return rows


def test_every_command_is_walked():
    assert set(all_commands()) >= {c for cmds in EXPECTED.values() for c in cmds}


@pytest.mark.parametrize("command", all_commands())
def test_shared_flags_have_the_shared_spellings(command):
    rows = help_flags(command)
    for flag, others in SHARED.items():
        for row in rows:
            if flag in row:
                assert others <= row, f"`{command}`: {flag} lacks {others - row}"
    flags = set().union(*rows)
    for flag, commands in EXPECTED.items():
        if command in commands:
            assert flag in flags, f"`{command} --help` has no {flag}"


def _options(cmd: click.Command):
    return [p for p in cmd.params if isinstance(p, click.Option)]


def _command(name: str) -> click.Command:
    cmd: click.Command = main
    for part in name.split():
        cmd = cmd.get_command(click.Context(cmd), part)  # type: ignore[attr-defined]
    return cmd


@pytest.mark.parametrize("command", all_commands())
def test_choice_lists_come_from_config(command):
    for option in _options(_command(command)):
        name = option.opts[0]
        expected = CHOICES.get(name)
        if name == "--format":
            expected = C.EXPORT_FORMATS if command == "export" else C.DATA_FORMATS
        if expected is not None:
            assert isinstance(option.type, click.Choice), f"{command} {name} is free text"
            assert tuple(option.type.choices) == tuple(expected), f"{command} {name}"


def test_data_modules_use_the_config_lists():
    from mlxsft.data import formats, templates

    assert formats.FORMATS is C.DATA_FORMATS
    assert templates.CHOICES is C.TEMPLATES and templates.BUILTIN is C.BUILTIN_TEMPLATES


def test_sampling_defaults_are_sampling_params():
    defaults = C.SamplingParams()
    for command in ("generate", "chat"):
        by_name = {o.name: o.default for o in _options(_command(command))}
        for field in ("temp", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens"):
            assert by_name[field] == getattr(defaults, field), (command, field)


@pytest.mark.parametrize(
    "argv, key, value",
    [
        (["--max-seq-length", "64"], "max_seq_len", 64),
        (["--steps-per-eval", "7"], "eval_every", 7),
        (["--adapter-path", "out"], "output", "out"),  # mlx-lm's name for the save directory
        (["-a", "old"], "adapter", "old"),
        (["--quantize", "4"], "quantize", 4),
    ],
)
def test_train_aliases_reach_the_config(monkeypatch, argv, key, value):
    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        raise SystemExit(0)

    import mlxsft.train.loop as loop

    monkeypatch.setattr(loop, "train", fake_train)
    result = CliRunner().invoke(main, ["train", "-m", "M", "-d", "D", *argv])
    assert result.exit_code == 0, result.output
    assert getattr(seen["cfg"], key) == value


def test_bad_choice_is_rejected_before_running():
    result = CliRunner().invoke(main, ["plan", "-m", "M", "--train-on", "everything"])
    assert result.exit_code == 2 and "'everything' is not one of" in result.output
