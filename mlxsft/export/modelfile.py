"""An Ollama `Modelfile` beside an exported GGUF file.

Ollama templates are Go templates, not Jinja, so the known chat formats (chatml, llama3, mistral,
gemma, phi3, and alpaca for base models) get a hand-written equivalent; any other template is
left to the Jinja copy embedded in the GGUF (`tokenizer.chat_template`) with a comment saying so.
"""

from __future__ import annotations

from pathlib import Path

# family -> (Go template, stop strings)
TEMPLATES: dict[str, tuple[str, list[str]]] = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n",
        ["<|im_start|>", "<|im_end|>"],
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "mistral": (
        '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{- end }}{{- end }}',
        ["[INST]", "[/INST]"],
    ),
    "gemma": (
        '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model'
        "{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        ["<start_of_turn>", "<end_of_turn>"],
    ),
    "phi3": (
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        ["<|end|>", "<|user|>", "<|assistant|>"],
    ),
    "alpaca": (
        "{{ if .System }}{{ .System }}{{ else }}Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.{{ end }}\n\n"
        "### Instruction:\n{{ .Prompt }}\n\n### Response:\n",
        ["### Instruction:", "### Response:"],
    ),
}

# A marker that identifies each family in a Jinja chat template, checked in this order.
_MARKERS = [
    ("llama3", "<|start_header_id|>"),
    ("chatml", "<|im_start|>"),
    ("gemma", "<start_of_turn>"),
    ("phi3", "<|assistant|>"),
    ("mistral", "[INST]"),
    ("alpaca", "### Instruction"),
]


def template_family(chat_template: str | None) -> str | None:
    """`alpaca` for no template (base models), the family of a known template, else None."""
    if not chat_template:
        return "alpaca"
    return next((fam for fam, marker in _MARKERS if marker in chat_template), None)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_name: str, chat_template: str | None, eos_token: str | None = None) -> str:
    """The Modelfile text for `FROM ./<gguf_name>`."""
    lines = [f"# Ollama Modelfile written by mlxsft: `ollama create NAME -f {'Modelfile'}`"]
    lines.append(f"FROM ./{gguf_name}")
    family = template_family(chat_template)
    if family is None:
        lines.append("# The chat template is not one of mlxsft's known families; Ollama will use")
        lines.append("# the Jinja template embedded in the GGUF (tokenizer.chat_template).")
        stops: list[str] = []
    else:
        tpl, stops = TEMPLATES[family]
        lines.append(f"# chat format: {family}")
        lines.append(f'TEMPLATE """{tpl}"""')
    if eos_token and eos_token not in stops:
        stops = [*stops, eos_token]
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(
    gguf_path: str | Path, chat_template: str | None, eos_token: str | None = None
) -> Path:
    """Write `Modelfile` next to `gguf_path`; returns its path."""
    gguf_path = Path(gguf_path)
    out = gguf_path.parent / "Modelfile"
    out.write_text(modelfile_text(gguf_path.name, chat_template, eos_token), encoding="utf-8")
    return out
