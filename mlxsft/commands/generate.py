"""`mlxsft generate` and `mlxsft chat`: prompts rendered with the training template, mlx-lm's
sampler and step loop. Imports only Click at module import; the model stack loads inside."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from mlxsft import config as C
from mlxsft.commands import options as opt

TEMPLATE_HELP = C.TEMPLATE_HELP + (
    ". With an mlxsft adapter, auto is the template it was trained with; else use that one."
)
_S = C.SamplingParams()  # the defaults


def _sampling_options(f: Callable) -> Callable:
    """The model, adapter, template and sampling flags shared by `generate` and `chat`."""
    options = [
        opt.model(required=True),
        opt.adapter(default=None),
        opt.template(default="auto", show_default=True, help=TEMPLATE_HELP),
        click.option("--system", default=None, help="System prompt."),
        click.option("--temp", type=click.FloatRange(min=0), default=_S.temp, show_default=True,
                     help="Sampling temperature; 0 is greedy."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=_S.top_p,
                     show_default=True, help="Nucleus sampling; 1 keeps all tokens."),
        click.option("--top-k", type=click.IntRange(min=0), default=_S.top_k, show_default=True,
                     help="Keep the k most likely tokens; 0 keeps all."),
        click.option("--min-p", type=click.FloatRange(0, 1, max_open=True), default=_S.min_p,
                     show_default=True, help="Drop tokens below min_p x the top probability."),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True),
                     default=_S.repetition_penalty, show_default=True,
                     help="1 switches it off; 1.1 is typical."),
        click.option("--seed", type=int, default=_S.seed, help="Random seed for sampling."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=_S.max_tokens,
                     show_default=True, help="Most tokens to generate (per reply)."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def _params(kw: dict[str, Any]) -> C.SamplingParams:
    return C.SamplingParams(
        temp=kw["temp"],
        top_p=kw["top_p"],
        top_k=kw["top_k"],
        min_p=kw["min_p"],
        repetition_penalty=kw["repetition_penalty"],
        seed=kw["seed"],
        max_tokens=kw["max_tokens"],
    )


@click.command()
@_sampling_options
@click.option("--prompt", "-p", default=None, help="The user message (or raw text with --raw).")
@click.option("--messages", "messages_file", default=None, type=click.Path(dir_okay=False),
              help='A .json/.jsonl file: {"messages": [...]} (first row) or a list of messages.')  # fmt: skip
@click.option("--raw", is_flag=True, help="No template: continue the prompt text as is.")
@click.option("--verbose/--quiet", default=True, show_default=True,
              help="Print tokens/s and memory to stderr at the end.")  # fmt: skip
def generate(prompt, messages_file, raw, verbose, **kw) -> None:
    """Generate a reply, rendered with the training template, streamed to stdout.

    Greedy (--temp 0) output equals `mlx_lm.generate` on the same prompt ids. Stops at the
    template's end-of-turn token or EOS.
    """
    from mlxsft.data.formats import read_conversation
    from mlxsft.data.types import Message
    from mlxsft.errors import UserError
    from mlxsft.generate import Generator

    if (prompt is None) == (messages_file is None):
        raise UserError("give exactly one of --prompt and --messages")
    if raw and (messages_file or kw["system"]):
        raise UserError("--raw takes a plain --prompt only", hint="drop --messages/--system")
    params = _params(kw)
    gen = Generator.load(
        kw["model"], adapter=kw["adapter"], template=None if raw else kw["template"]
    )
    if verbose:
        click.echo(f"[template: {gen.template.name if gen.template else 'none (raw)'}]", err=True)
    if raw:
        ids = gen.renderer.text_ids(prompt)
    else:
        conversation = read_conversation(messages_file) if messages_file else None
        messages = conversation.messages if conversation else []
        if prompt is not None:
            messages.append(Message("user", prompt))
        if kw["system"]:
            messages = [Message("system", kw["system"])] + [
                m for m in messages if m.role != "system"
            ]
        if messages[-1].role == "assistant":
            raise UserError("the last message is the assistant's", hint="end with a user message")
        ids = gen.renderer.prompt_ids(messages, tools=conversation and conversation.tools)

    def write(segment: str) -> None:
        sys.stdout.write(segment)
        sys.stdout.flush()

    result = gen.generate(ids, params, on_text=write)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if result.finish_reason == "length":  # a notice, not a statistic: shown even with --quiet
        click.echo(
            f"[cut at --max-tokens {params.max_tokens}: the reply may be incomplete]", err=True
        )
    if verbose:
        if result.finish_reason == "interrupted":
            click.echo("[interrupted]", err=True)
        click.echo(result.stats_line(), err=True)


@click.command()
@_sampling_options
@click.option("--max-context", type=click.IntRange(min=16), default=None,
              help="Context window in tokens (default: the model's); older turns are dropped.")  # fmt: skip
@click.option("--stats/--no-stats", default=True, show_default=True,
              help="Print tokens/s after each reply (stderr).")  # fmt: skip
@click.option("--record", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Append per reply a JSON line: prompt ids the model saw, ids fed, reply ids.")  # fmt: skip
def chat(max_context, stats, record, **kw) -> None:
    """Chat with a model in a REPL rendered with the training template (/help for commands).

    Replies go to stdout and notes to stderr, so piped stdin works for scripting: each line is a
    user message or a /command; EOF exits.
    """
    from mlxsft.chat import ChatSession, run_repl
    from mlxsft.generate import Generator

    params = _params(kw)
    gen = Generator.load(kw["model"], adapter=kw["adapter"], template=kw["template"])
    session = ChatSession(gen, system=kw["system"], params=params, max_context=max_context)
    if stats:
        click.echo(
            f"[template: {gen.template.name}; context window: {session.max_context}]", err=True
        )
    if record is None:
        run_repl(session, show_stats=stats)
        return
    with open(record, "a", encoding="utf-8") as rec:
        run_repl(session, show_stats=stats, record=rec)
