"""An Ollama `Modelfile` beside an exported GGUF file.

Ollama templates are Go templates, not Jinja, so the known chat formats (chatml, llama3, mistral,
gemma, phi3, zephyr, and alpaca for base models) get a hand-written equivalent; any other template is
left to the Jinja copy embedded in the GGUF (`tokenizer.chat_template`) with a comment saying so.
"""

from __future__ import annotations

from pathlib import Path

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)
# family -> (Go template, stop strings). They follow mlxsft's built-in Jinja templates
# (mlxsft/data/builtin_templates), which a model fine-tuned with mlxsft was trained on; "{eos}"
# is replaced by the tokenizer's eos token.
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
    "mistral": (  # the system message goes before the first user turn
        '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}'
        '{{ $system = .Content }}{{- else if eq .Role "user" }}'
        "[INST] {{ if $system }}{{ $system }}\n\n{{ end }}{{ .Content }} [/INST]"
        '{{ $system = "" }}{{- else if eq .Role "assistant" }} {{ .Content }}{eos}'
        "{{- end }}{{- end }}",
        ["[INST]", "[/INST]"],
    ),
    "gemma": (  # no system role: prepended to the first user turn; the assistant is "model"
        '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}'
        '{{ $system = .Content }}{{- else }}<start_of_turn>{{ if eq .Role "assistant" }}model'
        "{{ else }}user{{ end }}\n{{ if $system }}{{ $system }}\n\n{{ end }}{{ .Content }}"
        '<end_of_turn>\n{{ $system = "" }}{{- end }}{{- end }}<start_of_turn>model\n',
        ["<start_of_turn>", "<end_of_turn>"],
    ),
    "phi3": (
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        ["<|end|>", "<|user|>", "<|assistant|>"],
    ),
    "zephyr": (
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}{eos}\n{{ end }}<|assistant|>\n",
        ["<|system|>", "<|user|>", "<|assistant|>"],
    ),
    "alpaca": (  # a system message replaces the preamble
        f'{{{{- $system := "{ALPACA_PREAMBLE}" }}}}'
        '{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}{{- end }}'
        '{{- end }}{{ $system }}{{- range .Messages }}{{- if eq .Role "user" }}\n\n'
        '### Instruction:\n{{ .Content }}{{- else if eq .Role "assistant" }}\n\n'
        "### Response:\n{{ .Content }}{eos}{{- end }}{{- end }}\n\n### Response:\n",
        ["### Instruction:", "### Response:"],
    ),
}


def template_family(chat_template: str | None) -> str | None:
    """`alpaca` for no template (mlxsft trains base models with it), a known family, else None."""
    t = chat_template
    if not t:
        return "alpaca"
    if "<|start_header_id|>" in t:
        return "llama3"
    if "<|im_start|>" in t:
        return "chatml"
    if "<start_of_turn>" in t:
        return "gemma"
    if "<|assistant|>" in t:
        return "phi3" if "<|end|>" in t else "zephyr"
    if "[INST]" in t and "<<SYS>>" not in t:  # Llama 2 chat needs its own system format
        return "mistral"
    if "Below is an instruction that describes a task" in t and "### Instruction:" in t:
        return "alpaca"
    return None


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
        tpl = tpl.replace("{eos}", eos_token or "")
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
