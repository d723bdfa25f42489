"""Ollama Modelfile: family detection on real templates, and the Go templates rendered by Go's own
text/template (what Ollama uses) equal mlxsft's built-in Jinja templates (skipped without `go`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from mlxsft.export.modelfile import TEMPLATES, template_family

# Ollama's family label (chat_templates/ollama/index.json) -> ours; None = left to the Jinja copy.
OLLAMA_TO_OURS = {
    "chatml": "chatml",
    "zephyr": "zephyr",
    "mistral-instruct": "mistral",
    "gemma-instruct": "gemma",
    "gemma3-instruct": "gemma",
    "llama3-instruct": "llama3",
    "phi-3": "phi3",
}

GO_RENDER = """package main

import (
\t"encoding/json"
\t"os"
\t"strings"
\t"text/template"
)

type Message struct{ Role, Content string }

type Case struct {
\tTemplate string    `json:"template"`
\tMessages []Message `json:"messages"`
}

func main() {
\tvar cases []Case
\tif err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
\t\tpanic(err)
\t}
\touts := []string{}
\tfor _, c := range cases {
\t\tt := template.Must(template.New("t").Parse(c.Template))
\t\tvar b strings.Builder
\t\tdata := map[string]any{"Messages": c.Messages, "System": "", "Prompt": ""}
\t\tif err := t.Execute(&b, data); err != nil {
\t\t\tpanic(err)
\t\t}
\t\touts = append(outs, b.String())
\t}
\tjson.NewEncoder(os.Stdout).Encode(outs)
}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c\nd"},
    ],
]


def test_family_of_ollamas_collected_templates(shared_fixtures):
    index = shared_fixtures / "chat_templates" / "ollama" / "index.json"
    if not index.is_file():
        pytest.skip("ollama template fixtures absent")
    entries = json.loads(index.read_text())
    assert len(entries) == 37
    for entry in entries:
        want = OLLAMA_TO_OURS.get(entry["name"])
        assert template_family(entry["template"]) == want, entry["name"]


@pytest.mark.optional
def test_go_templates_render_like_builtin_jinja(tmp_path):
    go = shutil.which("go")
    if go is None:
        pytest.skip("go toolchain not installed")
    from mlxsft.data.templates import ChatTemplate, builtin_source

    (tmp_path / "main.go").write_text(GO_RENDER)
    (tmp_path / "go.mod").write_text("module render\n\ngo 1.18\n")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off", "GOCACHE": str(tmp_path / "c")}
    subprocess.run([go, "build", "-o", "render", "."], cwd=tmp_path, env=env, check=True)
    cases, expected = [], []
    for family in ("chatml", "llama3", "mistral", "gemma", "phi3", "alpaca"):
        go_template = TEMPLATES[family][0].replace("{eos}", "</s>")
        jinja = ChatTemplate(family, builtin_source(family), builtin=True)
        for messages in CONVERSATIONS:
            go_messages = [{"Role": m["role"], "Content": m["content"]} for m in messages]
            cases.append({"template": go_template, "messages": go_messages})
            expected.append(jinja.render(messages, add_generation_prompt=True, eos_token="</s>"))
    out = subprocess.run(
        [str(tmp_path / "render")], input=json.dumps(cases), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == expected
