"""`mlxsft fuse` and `mlxsft export`: ship a fine-tune as an HF model, a PEFT adapter or a GGUF."""

from __future__ import annotations

import click

from mlxsft import config as C
from mlxsft.commands import options as opt


@click.command("fuse")
@opt.model(required=True, help="Base model: a local HF-format dir or a hub id.")
@opt.adapter(
    required=True, type=click.Path(file_okay=False), help="Adapter dir (mlxsft / mlx-lm, or PEFT)."
)
@opt.output("Directory for the fused model (the base model is not changed).", "--save-path",
            required=True, type=click.Path())  # fmt: skip
@click.option("--dequantize", "--de-quantize", "dequantize", is_flag=True,
              help="Write float weights for a quantized base.")  # fmt: skip
@opt.quantize("Re-quantize after fusing.")
def fuse(model: str, adapter: str, output: str, dequantize: bool, quantize: int | None) -> None:
    """Merge a LoRA/DoRA adapter into the base weights; write an HF-format model directory.

    Prints a fidelity report (max |logit diff|, KL between base+adapter and the fused model) and
    warns when re-quantisation erased most of the adapter's effect.
    """
    from mlxsft.export.fuse import fuse_model

    fuse_model(
        model,
        adapter,
        output,
        dequantize=dequantize,
        quantize=quantize,
        echo=click.echo,
    )


@click.command("export")
@click.option("--format", "fmt", required=True, type=click.Choice(C.EXPORT_FORMATS))
@opt.output("PEFT dir, or FILE.gguf.", required=True, type=click.Path())
@opt.model(default=None, help="Base model (required for gguf).")
@opt.adapter(default=None, type=click.Path(file_okay=False), help="Adapter dir.")
@click.option(
    "--dtype",
    type=click.Choice(C.GGUF_DTYPES, case_sensitive=False),
    default=None,
    help="GGUF tensor type; q4_k_m/q5_k_m mix types per tensor as llama-quantize does."
    f" [{C.GGUF_DEFAULT_DTYPE}]",
)
def export(
    fmt: str, output: str, model: str | None, adapter: str | None, dtype: str | None
) -> None:
    """Export an adapter as a PEFT LoRA adapter, or a model (+ adapter) as GGUF + Ollama Modelfile.

    \b
    mlxsft export --adapter adapters --format peft --output peft_adapter [--model BASE]
    mlxsft export --model BASE [--adapter adapters] --format gguf --output model.gguf
    """
    from mlxsft.errors import UserError

    if fmt == "peft":
        from mlxsft.export.peft import export_peft

        if adapter is None:
            raise UserError("--format peft needs --adapter DIR")
        if dtype is not None:
            raise UserError("--dtype applies to --format gguf only", hint="drop --dtype")
        out = export_peft(adapter, output, base_model=model)
        click.echo(f"wrote PEFT adapter {out}")
        return
    from mlxsft.export.fuse import export_gguf

    if model is None:
        raise UserError("--format gguf needs --model (the base model)")
    export_gguf(
        model, output, adapter=adapter, dtype=dtype or C.GGUF_DEFAULT_DTYPE, echo=click.echo
    )
