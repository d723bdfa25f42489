"""Generation: prompts rendered and tokenized exactly as training encodes them, mlx-lm's own step
loop and samplers (so greedy output and speed match `mlx_lm.generate`), stopping at the template's
end-of-turn token or EOS, and tokens/s at the end. `chat.py` builds its REPL on `Generator`.

Prompt ids and stop tokens come from `mlxsft.data.render.Renderer`, the renderer training uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxsft.config import SamplingParams
from mlxsft.data.render import Renderer
from mlxsft.errors import UserError


@dataclass
class Generation:
    """One finished generation: its text, generated ids (stop token excluded) and timings."""

    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end-of-turn/EOS), "length" (max_tokens) or "interrupted"
    stop_token: int | None
    prompt_tokens: int
    prompt_seconds: float
    generation_seconds: float  # from the first generated token to the last

    @property
    def generation_tps(self) -> float:
        """Generated tokens per second, counted as mlx-lm does (stop token included)."""
        n = len(self.tokens) + (self.stop_token is not None)
        return n / self.generation_seconds if self.generation_seconds > 0 else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    def stats_line(self) -> str:
        import mlx.core as mx

        n = len(self.tokens) + (self.stop_token is not None)
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s | "
            f"generation: {n} tokens, {self.generation_tps:.1f} tokens/s | "
            f"peak memory: {mx.get_peak_memory() / 2**30:.3f} GB"
        )


class Generator:
    """A loaded model, its tokenizer and chat template, ready to generate."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: Any | None,
        *,
        config: dict | None = None,
        path: Path | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template  # a data.templates.ChatTemplate; None: raw prompts only
        self.config = config or {}
        self.path = path
        self.renderer = Renderer(tokenizer, template, eos_token_id=self.config.get("eos_token_id"))
        self.stop_ids: set[int] = set(self.renderer.stop_ids)
        self._detok_proto: Any = None

    @classmethod
    def load(
        cls, model: str, *, adapter: str | None = None, template: str | None = "auto"
    ) -> Generator:
        """Load `model` (+ `adapter`); `template=None` for raw prompts (no chat template).

        With `template="auto"` and an adapter trained by mlxsft, its run's template is used.
        """
        from mlxsft.data.templates import resolve_template
        from mlxsft.model.loading import load

        if template == "auto" and adapter is not None:
            template = trained_template(adapter) or "auto"
        loaded = load(model, adapter=adapter)  # mlx-lm or PEFT adapter dir
        chat_template = resolve_template(template, loaded.tokenizer) if template else None
        return cls(
            loaded.model, loaded.tokenizer, chat_template, config=loaded.config, path=loaded.path
        )

    @property
    def max_context(self) -> int:
        """The model's context window (max_position_embeddings), 4096 when unknown."""
        n = self.config.get("max_position_embeddings") or self.config.get("max_seq_len")
        return int(n) if n else 4096

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Ids of `messages` with the generation prompt, as training tokenizes them."""
        return self.renderer.prompt_ids(messages)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _detokenizer(self) -> Any:
        """A fresh streaming detokenizer (the prototype's token map is built once)."""
        import copy

        from mlxsft import _mlxlm

        if self._detok_proto is None:
            self._detok_proto = _mlxlm.streaming_detokenizer(self.tokenizer, self.path)
        detok = copy.copy(self._detok_proto)
        detok.reset()
        return detok

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        cache: list[Any] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Generate after `prompt_ids` (fed on top of `cache`, updated in place), streaming text
        segments to `on_text`. Ctrl-C ends the reply early (finish_reason "interrupted")."""
        import mlx.core as mx

        from mlxsft import _mlxlm

        if not prompt_ids:
            raise UserError("empty prompt", hint="give a non-empty --prompt")
        if params.seed is not None:
            mx.random.seed(params.seed)
        cache = cache if cache is not None else _mlxlm.make_cache(self.model)
        sampler = _mlxlm.make_sampler(params.temp, params.top_p, params.top_k, params.min_p)
        penalty = params.repetition_penalty
        processors = (
            _mlxlm.make_logits_processors(penalty, params.repetition_context_size)
            if penalty != 1.0
            else None
        )
        detok = self._detokenizer()
        steps = _mlxlm.generate_step(
            mx.array(prompt_ids),
            self.model,
            max_tokens=params.max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prompt_cache=cache,
        )
        tokens: list[int] = []
        stop_token, finish = None, "length"
        tic = time.perf_counter()
        prompt_s = 0.0
        try:
            with _mlxlm.generation_context(self.model):
                for n, (token, _) in enumerate(steps):
                    if n == 0:
                        prompt_s, tic = time.perf_counter() - tic, time.perf_counter()
                    if token in self.stop_ids:
                        stop_token, finish = token, "stop"
                        break
                    tokens.append(token)
                    detok.add_token(token)
                    if on_text is not None and (segment := detok.last_segment):
                        on_text(segment)
        except KeyboardInterrupt:
            finish = "interrupted"
        steps.close()
        gen_s = time.perf_counter() - tic if tokens or stop_token is not None else 0.0
        detok.finalize()
        if on_text is not None and (segment := detok.last_segment):
            on_text(segment)
        return Generation(
            text=detok.text,
            tokens=tokens,
            finish_reason=finish,
            stop_token=stop_token,
            prompt_tokens=len(prompt_ids),
            prompt_seconds=prompt_s,
            generation_seconds=gen_s,
        )


def trained_template(adapter: str) -> str | None:
    """The --template an adapter was trained with (its run's config.yaml), unless "auto"."""
    from mlxsft.rundir import read_config

    name = read_config(adapter).get("template")
    return name if isinstance(name, str) and name != "auto" else None
