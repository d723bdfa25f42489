"""Generation-based evaluation: greedy replies to held-out prompts, scored against references.

A loss can fall while the model still never stops, so at every evaluation a run with
`--eval-prompts FILE` (or `--eval-prompts valid`) generates greedily for up to
`--eval-num-prompts` prompts and reports
  exact    the reply equals the reference (whitespace-normalised)
  contains the reference occurs in the reply
  stop     the reply ended with an end-of-turn / EOS token before `--eval-max-tokens`
Each row's last assistant message is its reference; the messages before it are the prompt,
rendered and tokenized exactly as training does (data/render.py). Records go to metrics.jsonl as
{"type": "gen_eval", "step", "exact_match", "contains_match", "stop_rate", "n_prompts",
"mean_reply_tokens"} (rates in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mlxsft import _mlxlm
from mlxsft.data.render import template_messages
from mlxsft.data.types import Example

N_SAMPLES = 2  # replies printed at each evaluation


@dataclass
class EvalPrompt:
    messages: list[dict[str, Any]]  # template dicts of the conversation before the reference
    reference: str
    source: str


@dataclass
class Reply:
    prompt: EvalPrompt
    text: str
    n_tokens: int
    stopped: bool

    @property
    def exact(self) -> bool:
        return _norm(self.text) == _norm(self.prompt.reference)

    @property
    def contains(self) -> bool:
        return _norm(self.prompt.reference) in _norm(self.text)


@dataclass
class GenEvalResult:
    replies: list[Reply] = field(default_factory=list)
    max_tokens: int = 0

    def _rate(self, flags: list[bool]) -> float:
        return sum(flags) / max(len(flags), 1)

    def record(self, step: int) -> dict[str, Any]:
        r = self.replies
        return {
            "type": "gen_eval",
            "step": step,
            "exact_match": self._rate([x.exact for x in r]),
            "contains_match": self._rate([x.contains for x in r]),
            "stop_rate": self._rate([x.stopped for x in r]),
            "n_prompts": len(r),
            "mean_reply_tokens": sum(x.n_tokens for x in r) / max(len(r), 1),
        }

    def lines(self, step: int) -> list[str]:
        rec, n = self.record(step), len(self.replies)
        out = [
            f"gen eval at step {step}: exact {rec['exact_match']:.0%}, contains "
            f"{rec['contains_match']:.0%}, stopped {rec['stop_rate']:.0%} of {n} replies within "
            f"{self.max_tokens} tokens (mean {rec['mean_reply_tokens']:.1f} tokens)"
        ]
        for x in self.replies[:N_SAMPLES]:
            ask = _short(x.prompt.messages[-1]["content"] if x.prompt.messages else "")
            end = "stop" if x.stopped else "no stop"
            out.append(
                f"  {x.prompt.source}: {ask!r} -> {_short(x.text)!r} [{end}] "
                f"(reference {_short(x.prompt.reference)!r})"
            )
        return out


def _norm(text: str) -> str:
    return " ".join(text.split())


def _short(text: str, n: int = 60) -> str:
    text = _norm(text)
    return text if len(text) <= n else text[: n - 3] + "..."


def prompts_from_examples(examples: Sequence[Example], limit: int) -> list[EvalPrompt]:
    """Up to `limit` prompts: each example's last assistant turn is the reference, the turns
    before it the prompt, as the template sees them in training (an alpaca row's input included;
    examples without both are skipped)."""
    out = []
    for ex in examples:
        last = max((i for i, m in enumerate(ex.messages) if m.role == "assistant"), default=None)
        if last is None or last == 0:
            continue
        messages = template_messages(ex)[:last]
        out.append(EvalPrompt(messages, ex.messages[last].content, ex.source))
        if len(out) == limit:
            break
    return out


def greedy_reply(
    model: Any, prompt_ids: list[int], stop_ids: frozenset[int] | set[int], max_tokens: int
) -> tuple[list[int], bool]:
    """Greedy continuation of `prompt_ids` -> (generated ids without the stop token, stopped)."""
    cache = _mlxlm.make_cache(model)
    sampler = _mlxlm.make_sampler(0.0, 1.0, 0, 0.0)
    steps = _mlxlm.generate_step(
        mx.array(prompt_ids),
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=None,
        prompt_cache=cache,
    )
    tokens, stopped = [], False
    for token, _ in steps:
        if int(token) in stop_ids:
            stopped = True
            break
        tokens.append(int(token))
    steps.close()
    return tokens, stopped


def generation_eval(
    model: Any, renderer: Any, prompts: Sequence[EvalPrompt], max_tokens: int
) -> GenEvalResult:
    """Greedy replies for `prompts` (LoRA dropout off meanwhile), scored."""
    was_training = model.training
    model.eval()
    result = GenEvalResult(max_tokens=max_tokens)
    try:
        for p in prompts:
            ids, stopped = greedy_reply(
                model, renderer.prompt_ids(p.messages), renderer.stop_ids, max_tokens
            )
            text = renderer.tokenizer.decode(ids)
            result.replies.append(Reply(p, text, len(ids), stopped))
    finally:
        model.train(was_training)
    return result
