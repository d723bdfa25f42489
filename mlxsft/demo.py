"""`mlxsft demo`: an offline fine-tune you can watch learn, end to end, in a few CPU minutes.

The flow is the one a user runs by hand: build (or reuse) a tiny model whose tokenizer is trained
on the demo data, show inspected examples with trained tokens marked, measure validation loss and
exact-match accuracy on held-out test prompts, train with `mlxsft.train.loop.train`, measure
again, fuse the adapter and answer one prompt with the fused model. The demo data
(`mlxsft/demo_data`, written by `examples/data/make_demo_data.py`) are small tasks with checkable
answers whose test prompts never appear in training, so the accuracy gain is learned, not recalled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
# The tiny model: small enough to train in minutes on 2 CPU cores, big enough to learn the tasks.
TINY_MODEL = dict(
    arch="llama",
    vocab_size=384,
    hidden_size=128,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    intermediate_size=256,
    tie_word_embeddings=True,
    chat_template="chatml",
    seed=0,
)


@dataclass(frozen=True)
class DemoPlan:
    """How one demo run trains and how much it evaluates."""

    fine_tune_type: str
    iters: int
    batch_size: int  # packed rows of max_seq_len tokens
    max_seq_len: int
    learning_rate: float
    n_test: int  # held-out test prompts scored by exact match
    eval_every: int
    rank: int = 8
    minutes: float | None = None  # measured wall time on 2 CPU cores with OpenBLAS, model cached

    def what(self) -> str:
        """What this plan trains, in words."""
        if self.fine_tune_type == "lora":
            return f"a LoRA fine-tune (rank-{self.rank} adapter)"
        return "a full fine-tune (all weights)"


# The tiny model starts from random weights, so the demo trains all of them ("full"): LoRA on a
# random base learns far slower. On a real (pretrained) model the demo trains a LoRA adapter.
# FULL takes ~2-3 min on 2 CPU cores; QUICK is the CI run (< 60 s) and still learns. A real model
# (--model) trains LoRA, with or without --quick; its time depends on the model.
FULL = DemoPlan("full", iters=1500, batch_size=8, max_seq_len=128, learning_rate=1e-3,
                n_test=100, eval_every=250, minutes=2.5)  # fmt: skip
QUICK = DemoPlan("full", iters=300, batch_size=8, max_seq_len=128, learning_rate=1e-3,
                 n_test=30, eval_every=60, minutes=0.6)  # fmt: skip
HUB = DemoPlan("lora", iters=200, batch_size=4, max_seq_len=512, learning_rate=2e-4,
               n_test=30, eval_every=100, rank=16)  # fmt: skip
HUB_QUICK = DemoPlan("lora", iters=50, batch_size=4, max_seq_len=512, learning_rate=2e-4,
                     n_test=10, eval_every=25, rank=16)  # fmt: skip


def pick_plan(*, quick: bool, tiny: bool) -> DemoPlan:
    """The tiny model trains all weights; a real model always trains LoRA (quick or not)."""
    if tiny:
        return QUICK if quick else FULL
    return HUB_QUICK if quick else HUB


def expected_time(plan: DemoPlan, *, slow_blas: bool) -> str:
    """'about N minutes' as measured on 2 CPU cores (or why it cannot be said)."""
    if plan.minutes is None:
        return "time depends on the model's size"
    text = (
        "under a minute" if plan.minutes < 1 else f"about {math.ceil(plan.minutes)} minutes"
    ) + " on 2 idle CPU cores"
    if slow_blas:
        text += " with OpenBLAS; ~5-10x longer on the reference BLAS this machine uses (see above)"
    return text


@dataclass
class Score:
    """Validation loss and exact-match accuracy on test prompts (per task too)."""

    val_loss: float
    accuracy: float
    per_task: dict[str, float]
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, want, got)


@dataclass
class DemoResult:
    before: Score
    after: Score
    output: Path
    adapter: Path
    fused: Path
    answer: tuple[str, str]  # (prompt, fused model's answer)
    train_s: float
    total_s: float


def cache_root() -> Path:
    """$MLXSFT_CACHE, else ~/.cache/mlxsft."""
    env = os.environ.get("MLXSFT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mlxsft"


def read_split(split: str, data_dir: Path = DEMO_DATA) -> list[dict[str, Any]]:
    """Rows of one demo split (chat `messages` rows)."""
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: demo data missing (reinstall mlxsft)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def task_of(prompt: str) -> str:
    """The task a demo prompt asks for: the words before its ':' or '?'."""
    head = prompt.split(":")[0].split("?")[0]
    return head.lower().replace("the ", "").strip()


def tiny_model(data_dir: Path = DEMO_DATA, *, echo: Callable[[str], None] = print) -> Path:
    """The demo's tiny model under cache_root()/demo, built on first use (tokenizer trained on the
    demo's train split), reused after; the cache key covers the settings and the data."""
    from mlxsft.demo_model import build_tiny_checkpoint

    train_text = (data_dir / "train.jsonl").read_bytes()
    key = hashlib.sha256(json.dumps(TINY_MODEL, sort_keys=True).encode() + train_text)
    out = cache_root() / "demo" / f"tiny-{key.hexdigest()[:12]}"
    if (out / "config.json").is_file():
        echo(f"tiny model: {out} (cached)")
        return out
    corpus = [m["content"] for row in read_split("train", data_dir) for m in row["messages"]]
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    settings = dict(TINY_MODEL)
    build_tiny_checkpoint(tmp, settings.pop("arch"), corpus=corpus, **settings)
    try:
        tmp.rename(out)
    except OSError:  # another process built it at the same time: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    echo(f"tiny model: built {out}")
    return out


def exact_match(generator: Any, rows: list[dict[str, Any]], *, max_tokens: int = 24) -> Score:
    """Greedy answers to each row's prompt, scored by exact match with its reference answer."""
    from mlxsft.config import SamplingParams

    params = SamplingParams(temp=0.0, max_tokens=max_tokens)
    hits: dict[str, list[bool]] = {}
    samples = []
    for row in rows:
        prompt, want = row["messages"][0]["content"], row["messages"][-1]["content"]
        got = generator.generate(generator.prompt_ids(row["messages"][:-1]), params).text.strip()
        hits.setdefault(task_of(prompt), []).append(got == want)
        samples.append((prompt, want, got))
    n_right = sum(sum(v) for v in hits.values())
    per_task = {task: sum(v) / len(v) for task, v in hits.items()}
    return Score(float("nan"), n_right / max(len(rows), 1), per_task, samples)


def score(cfg: Any, rows: list[dict[str, Any]], adapter: str | None) -> Score:
    """Validation loss (masked CE, as in training) + exact match on `rows`."""
    from dataclasses import replace

    from mlxsft.generate import Generator
    from mlxsft.train.evaluate import evaluate_model

    loss = evaluate_model(replace(cfg, adapter=adapter), split="valid")["loss"]
    result = exact_match(Generator.load(cfg.model, adapter=adapter), rows)
    result.val_loss = loss
    return result


def demo_config(model: str, data: Path, output: Path, plan: DemoPlan) -> Any:
    """The TrainConfig the demo trains with (what `mlxsft train` flags would say)."""
    from mlxsft.config import TrainConfig

    return TrainConfig(
        model=model,
        data=str(data),
        output=str(output / "adapters"),
        fine_tune_type=plan.fine_tune_type,
        rank=plan.rank,
        alpha=2.0 * plan.rank,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        lr_schedule="cosine",
        warmup=0.05,
        max_grad_norm=1.0,
        iters=plan.iters,
        max_seq_len=plan.max_seq_len,
        eval_every=plan.eval_every,
        save_every=0,
        steps_per_report=max(1, plan.iters // 12),
        seed=0,
    ).validate()


def show_examples(model: str, data: Path, *, n: int, echo: Callable[[str], None]) -> None:
    """`mlxsft data inspect`'s rendering of the first `n` training rows (trained tokens marked)."""
    import sys

    from mlxsft.data.encode import encode_dataset
    from mlxsft.data.formats import read_examples
    from mlxsft.data.stats import marked_text
    from mlxsft.data.templates import resolve_template
    from mlxsft.model.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    examples, _ = read_examples(str(data), "auto", split="train")
    encoded, _ = encode_dataset(
        examples[:n], tokenizer, resolve_template("auto", tokenizer), "responses", None
    )
    color = sys.stdout.isatty()
    mark = "green" if color else "inside [[...]]"
    echo(f"training examples (trained tokens {mark}; everything else is context):")
    for i, enc in enumerate(encoded):
        text = marked_text(tokenizer, enc.input_ids, enc.loss_mask, color=color).strip()
        echo(("\n" if i else "") + "\n".join("    " + line for line in text.splitlines()))


def _score_line(name: str, s: Score) -> str:
    tasks = "  ".join(f"{t} {100 * a:.0f}%" for t, a in s.per_task.items())
    return f"{name}: val loss {s.val_loss:.3f}, exact match {100 * s.accuracy:.1f}%  ({tasks})"


def run_demo(
    *,
    quick: bool = False,
    model: str | None = None,
    output: str | Path = "mlxsft-demo",
    echo: Callable[[str], None] = print,
    plan: DemoPlan | None = None,
) -> DemoResult:
    """The whole demo; returns the before/after scores (see the module docstring)."""
    from mlxsft.train.loop import train

    t0 = time.perf_counter()
    out = Path(output)
    tiny = model is None
    plan = plan or pick_plan(quick=quick, tiny=tiny)
    base = "a tiny 2-layer model built offline" if tiny else model
    echo(f"demo: {plan.what()} of {base}, {plan.iters} steps; {_time_note(plan)}")
    echo("== 1/6 model")
    model = _resolve_model(model, echo)
    data = DEMO_DATA
    cfg = demo_config(model, data, out, plan)
    test_rows = read_split("test", data)[: plan.n_test]

    echo("\n== 2/6 data: small tasks with checkable answers; test prompts never seen in training")
    show_examples(model, data, n=3, echo=echo)

    echo(f"\n== 3/6 before training: scoring {len(test_rows)} held-out test prompts")
    before = score(cfg, test_rows, adapter=None)
    echo(_score_line("before", before))

    what = f"LoRA rank {plan.rank}" if plan.fine_tune_type == "lora" else "all weights"
    echo(f"\n== 4/6 training {what}: {plan.iters} steps of {plan.batch_size} packed rows")
    t_train = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t_train

    echo(f"\n== 5/6 after training: the same {len(test_rows)} held-out prompts")
    after = score(cfg, test_rows, adapter=str(result.output))
    echo(_score_line("after", after))
    for prompt, want, got in after.samples[:6]:
        verdict = "  right" if got == want else f"  wrong (want {want!r})"
        echo(f"  {prompt!r} -> {got!r}{verdict}")

    echo("\n== 6/6 fuse the adapter into the model and ask it one question")
    fused = out / "fused"
    answer = fuse_and_answer(model, result.output, fused, test_rows[0]["messages"][:-1], echo)

    res = DemoResult(before, after, out, result.output, fused, answer, train_s, 0.0)
    res.total_s = time.perf_counter() - t0
    echo("\n" + summary(res))
    return res


def _time_note(plan: DemoPlan) -> str:
    from mlxsft.blas import blas_status

    return expected_time(plan, slow_blas=blas_status().slow)


def _resolve_model(model: str | None, echo: Callable[[str], None]) -> str:
    """The tiny demo model (built or cached), or MODEL as a local directory."""
    if model is None:
        return str(tiny_model(echo=echo))
    from mlxsft.model.loading import resolve_model_path

    path = str(resolve_model_path(model))  # downloads once; a one-line error when offline
    echo(f"model: {path}")
    return path


def fuse_and_answer(
    model: str, adapter: Path, fused: Path, question: list[dict], echo: Callable[[str], None]
) -> tuple[str, str]:
    """Fuse `adapter` into `model` at `fused`, then answer `question` greedily with it."""
    from mlxsft.config import SamplingParams
    from mlxsft.export.fuse import fuse_model
    from mlxsft.generate import Generator

    fuse_model(model, adapter, fused, echo=lambda line: echo("  " + line))
    generator = Generator.load(str(fused))
    reply = generator.generate(generator.prompt_ids(question), SamplingParams(max_tokens=24))
    answer = (question[-1]["content"], reply.text.strip())
    echo(f"  user: {answer[0]}\n  fused model: {answer[1]}")
    return answer


def summary(r: DemoResult) -> str:
    """The closing table: before/after loss and accuracy, time, where things are."""
    lines = [
        "summary",
        f"  val loss      {r.before.val_loss:7.3f}  -> {r.after.val_loss:7.3f}",
        f"  exact match   {100 * r.before.accuracy:6.1f}%  -> {100 * r.after.accuracy:6.1f}%"
        "   (held-out test prompts)",
        f"  time          {r.train_s:.0f} s training, {r.total_s:.0f} s in all",
        f"  adapter       {r.adapter}",
        f"  fused model   {r.fused}",
        f"  next          mlxsft report {r.adapter}   |   mlxsft chat --model {r.fused}",
    ]
    return "\n".join(lines)
