"""Fuzzing (hypothesis) the two hostile-input surfaces: data rows and chat templates. Whatever
the input: no traceback (only DataError / UserError, one line, `file:line` for rows), no hang."""

from __future__ import annotations

import json
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxsft.data import templates
from mlxsft.data.formats import read_examples
from mlxsft.data.templates import ChatTemplate
from mlxsft.errors import UserError

FAST = settings(
    max_examples=40,
    deadline=2000,  # ms per example: a hang fails the test instead of stalling it
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_turn = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "gpt", "bogus", ""]),
     "content": st.one_of(st.text(), st.none(), st.integers(), st.lists(_json, max_size=2))}
)  # fmt: skip
_row = st.one_of(
    _json,
    st.fixed_dictionaries({"messages": st.lists(_turn, max_size=4)}),
    st.fixed_dictionaries({"instruction": st.text(), "output": _json}),
    st.fixed_dictionaries({"prompt": _json, "completion": st.text()}),
    st.fixed_dictionaries({"text": _json}),
)


def _line(row) -> bytes:
    return json.dumps(row).encode()


_lines = st.lists(
    st.one_of(
        _row.map(_line),
        st.binary(max_size=40),  # anything, invalid UTF-8 included
        st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
        st.sampled_from([b'{"text": "\\ud800"}', b"\xef\xbb\xbf{}", b"", b"{", b"\x00"]),
    ),
    max_size=6,
)


@FAST
@given(lines=_lines, suffix=st.sampled_from([".jsonl", ".json"]))
def test_any_data_file_gives_rows_or_file_line_errors(tmp_path_factory, lines, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"d{suffix}"
    path.write_bytes(b"\n".join(lines))
    where = re.compile(re.escape(str(path)) + r"(:\d+)?$")
    try:
        examples, errors = read_examples(path)
    except UserError as exc:  # the whole file refused (e.g. binary): one line naming it
        assert exc.where and where.match(exc.where) and "\n" not in str(exc), str(exc)
        return
    for err in errors:
        assert where.match(err.where or ""), err.where
        assert "\n" not in str(err)
    for ex in examples:
        assert where.match(ex.source)


_pieces = st.sampled_from([
    "{{ messages[0].content }}", "{% for m in messages %}{{ m.role }}{% endfor %}",
    "{% for i in range(N) %}", "{% endfor %}", "{{ 'ab' * N }}", "{{ N ** N }}", "{{ 1 / N }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{ raise_exception('x') }}",
    "{% if add_generation_prompt %}", "{% endif %}", "{{ messages | tojson }}", "{{ x.y.z }}",
    "{{ range(N) | list | length }}", "{% set n = namespace(a=N) %}{{ n.a }}", "{{", "}}",
    "{{ messages.__class__ }}", "{{ (messages | first).content[N] }}", "text",
])  # fmt: skip


@FAST
@given(
    pieces=st.lists(_pieces, max_size=6),
    numbers=st.lists(st.sampled_from([0, 1, 7, 10**5, 10**9]), min_size=6, max_size=6),
    content=st.text(max_size=20),
)
def test_any_template_renders_or_fails_in_one_line(pieces, numbers, content):
    # smaller bounds than in production, so each example is quick; the same code paths
    limits = {"range_items": 20_000, "chars": 200_000, "seconds": 1.0}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in limits.items():
            mp.setitem(templates.RENDER_LIMITS, key, value)
        _render_once(pieces, numbers, content)


def _render_once(pieces, numbers, content) -> None:
    source = "".join(p.replace("N", str(n)) for p, n in zip(pieces, numbers, strict=False))
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]
    t0 = time.perf_counter()
    try:
        out = ChatTemplate("fuzz", source, builtin=False).render(messages, where="d.jsonl:1")
        assert isinstance(out, str)
    except UserError as exc:  # TemplateRenderError, or a syntax error when compiling
        assert "\n" not in str(exc)
    assert time.perf_counter() - t0 < 5
