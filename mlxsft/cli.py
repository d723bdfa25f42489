"""The `mlxsft` command line: a Click group whose subcommands live in `mlxsft.commands`.

Subcommand modules import only Click at import time, so `mlxsft --help` stays fast; mlx, mlx-lm
and transformers are imported inside the commands that need them. User errors (ValueError,
FileNotFoundError) become one line on stderr and exit status 2; set MLXSFT_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

# name -> "module:attribute". Order is the order `--help` lists them in.
COMMANDS: dict[str, str] = {
    "data": "mlxsft.commands.data:data",
    "train": "mlxsft.commands.train:train",
    "eval": "mlxsft.commands.train:eval_cmd",
    "plan": "mlxsft.commands.plan:plan",
    "fuse": "mlxsft.commands.export:fuse",
    "export": "mlxsft.commands.export:export",
    "generate": "mlxsft.commands.generate:generate",
    "chat": "mlxsft.commands.generate:chat",
    "demo": "mlxsft.commands.demo:demo",
    "report": "mlxsft.commands.report:report",
}


class _Group(click.Group):
    """Loads each subcommand from its module on first use; reports user errors in one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            if os.environ.get("MLXSFT_DEBUG"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:  # a full disk or a permission problem anywhere: one line too
            from mlxsft.rundir import write_error

            error = write_error(exc, exc.filename or "", run=False)
            if error is None or os.environ.get("MLXSFT_DEBUG"):
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


# Subcommands that run models: on Linux they load OpenBLAS before mlx is imported (mlxsft/blas.py;
# ~10x faster matmuls than the wheel's reference BLAS; opt out with MLXSFT_NO_BLAS_PRELOAD=1).
_RUNS_MODELS = {"train", "eval", "plan", "fuse", "export", "generate", "chat", "demo"}


def quiet_third_party() -> None:
    """Hide transformers' advice and warnings ("PyTorch was not found", "Token indices sequence
    length is longer than ...": mlxsft truncates itself) and Python warnings raised inside
    third-party packages. Environment variables, so re-exec'd and launched processes inherit
    them; a user's own setting wins."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for module in ("transformers", "huggingface_hub", "tokenizers", "mlx_lm", "jinja2"):
        warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxsft")
@click.option("-v", "--verbose", is_flag=True, help="Also show third-party warnings.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Supervised instruction fine-tuning with MLX: exact response-only masks, packing, LoRA."""
    if not verbose:
        quiet_third_party()
    if ctx.invoked_subcommand in _RUNS_MODELS and "--help" not in sys.argv and "-h" not in sys.argv:
        from mlxsft.blas import maybe_reexec_with_fast_blas

        maybe_reexec_with_fast_blas()
