"""Hostile chat templates render with bounds: a one-line TemplateRenderError naming the row,
quickly, for huge ranges, nested loops, recursion, division by zero and huge results."""

from __future__ import annotations

import time

import pytest

from mlxsft.data import templates
from mlxsft.data.templates import ChatTemplate, TemplateRenderError

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


@pytest.mark.parametrize(
    "source, problem",
    [
        ("{{ range(10**9) | length }}", "Range too big"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
         "loops over more than 1,000,000 items"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ 'x' * 10**9 }}", "a repetition (`*`) builds a result that is too large"),
        ("{{ [1] * 10**9 }}", "a repetition (`*`) builds a result that is too large"),
        ("{{ 10 ** 10000000 }}", "a power (`**`) builds a number that is too large"),
        ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output over 10,000,000"),
        ("{{ raise_exception('no system role') }}", "raised: no system role"),
        ("{{ messages.__class__.__mro__ }}", "raised"),  # the sandbox
    ],
)  # fmt: skip
def test_hostile_template_fails_in_one_line(source, problem):
    template = ChatTemplate("evil", source, builtin=False)
    t0 = time.perf_counter()
    with pytest.raises(TemplateRenderError) as info:
        template.render(MESSAGES, where="d.jsonl:3")
    assert time.perf_counter() - t0 < 5
    text = str(info.value)
    assert text.startswith("d.jsonl:3: template 'evil' ") and problem in text, text
    assert "\n" not in text


def test_render_time_limit(monkeypatch):
    # ~13M loop steps (about a second on a fast idle core) against a 0.02 s limit, checked every
    # 4096 range items: it must stop long before the end on any machine, loaded or idle.
    monkeypatch.setitem(templates.RENDER_LIMITS, "seconds", 0.02)
    source = "{% for i in range(99999) %}{% for c in 'abcdefgh' * 16 %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateRenderError, match=r"rendering took over 0.02 s"):
        ChatTemplate("slow", source, builtin=False).render(MESSAGES)


def test_normal_templates_are_untouched():
    source = "{% for m in messages %}{{ m.role }}: {{ m.content * 2 }}{{ 2 ** 10 }}\n{% endfor %}"
    out = ChatTemplate("ok", source, builtin=False).render(MESSAGES)
    assert out == "user: hihi1024\nassistant: yoyo1024\n"
