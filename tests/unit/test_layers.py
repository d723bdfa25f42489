"""Import rules of the package, read from the source (ast; nothing is imported).

Layers point only down: commands -> recipes -> engine -> model -> data, with `_mlxlm` (the mlx-lm
boundary) under model/ and `base` (errors, config, rundir, runguard, blas) under everything. A module may
import modules of its own layer or of lower ones; lazy imports inside functions count too.
Recipes are the modules behind one user-facing operation; they are named here one by one, so the
folders need not move. Besides the layers:
- `data/` and `base` never import mlx, mlx-lm or transformers;
- only `_mlxlm` imports mlx-lm, and only `_mlxlm` and `model/loading` import transformers;
- only `_mlxlm` reads mlx-lm model internals (`embed_tokens`, `lm_head`, `layers`);
- a name is imported from the module that defines it (no re-exports), and modules form no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ORDER = ["base", "data", "mlxlm", "model", "engine", "recipes", "commands"]  # lowest first
PACKAGES = {  # package -> layer of its modules, unless named in MODULES
    "mlxsft.commands": "commands",
    "mlxsft.train": "engine",
    "mlxsft.export": "engine",
    "mlxsft.model": "model",
    "mlxsft.data": "data",
}
MODULES = {
    "mlxsft": "base",
    "mlxsft.errors": "base",
    "mlxsft.config": "base",
    "mlxsft.blas": "base",
    "mlxsft.rundir": "base",  # names and reads/writes the files of a run directory (no mlx)
    "mlxsft.runguard": "base",  # the run lock and the resume fingerprint (no mlx)
    "mlxsft._mlxlm": "mlxlm",
    "mlxsft.demo_model": "model",  # tiny checkpoints for the demo and the tests
    "mlxsft.cli": "commands",
    "mlxsft.__main__": "commands",
    # recipes: train, eval, fuse + export, generate, chat, demo, plan, report
    "mlxsft.train.loop": "recipes",
    "mlxsft.train.evaluate": "recipes",
    "mlxsft.export.fuse": "recipes",
    "mlxsft.generate": "recipes",
    "mlxsft.chat": "recipes",
    "mlxsft.demo": "recipes",
    "mlxsft.plan": "recipes",
    "mlxsft.report": "recipes",
}
NO_MLX = {"base", "data"}
MLX = ("mlx", "mlx_lm", "transformers")
IMPORTERS = {"mlx_lm": {"mlxsft._mlxlm"}, "transformers": {"mlxsft._mlxlm", "mlxsft.model.loading"}}
INTERNALS = {"embed_tokens", "lm_head", "layers"}

# Known violations that other parts of issue 12 remove. Each entry must still be a violation
# (the test says when one is fixed), so this list only shrinks.
ALLOWED_IMPORTS: set[tuple[str, str]] = set()
ALLOWED_INTERNALS: set[str] = set()


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_name(p): p for p in sorted((ROOT / "mlxsft").rglob("*.py"))}
TREES = {name: ast.parse(p.read_text(encoding="utf-8")) for name, p in SOURCES.items()}


def _layer(module: str) -> str | None:
    if module in MODULES:
        return MODULES[module]
    return PACKAGES.get(".".join(module.split(".")[:2]))


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """(imported module, name imported from it or None, line) for every import in `name`."""
    is_package = SOURCES[name].name == "__init__.py"
    out = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(package + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append(
                    (sub, None, node.lineno) if sub in SOURCES else (base, a.name, node.lineno)
                )
    return out


def _defined(module: str) -> set[str]:
    """Names a module binds at top level other than by importing them."""
    names: set[str] = set()
    todo = list(TREES[module].body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):  # top-level blocks bind names too
            todo += [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)]
    return names


def _internal_reads(module: str) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(TREES[module])
        if (isinstance(node, ast.Attribute) and node.attr in INTERNALS)
        or (isinstance(node, ast.Constant) and node.value in INTERNALS)
    ]


def test_every_module_has_a_layer():
    missing = [m for m in SOURCES if _layer(m) is None]
    assert not missing, f"add {missing} to MODULES or PACKAGES in {__file__}"


def _layer_violations() -> set[tuple[str, str]]:
    bad = set()
    for name in SOURCES:
        for target, _, _ in _imports(name):
            if target in SOURCES and ORDER.index(_layer(target)) > ORDER.index(_layer(name)):
                bad.add((name, target))
    return bad


def test_layers_point_only_down():
    bad = _layer_violations()
    unexpected = sorted(
        f"{a} ({_layer(a)}) imports {b} ({_layer(b)})" for a, b in bad - ALLOWED_IMPORTS
    )
    assert not unexpected, "imports pointing up a layer:\n" + "\n".join(unexpected)
    fixed = ALLOWED_IMPORTS - bad
    assert not fixed, f"fixed, so remove them from ALLOWED_IMPORTS: {sorted(fixed)}"


def test_heavy_libraries_stay_behind_their_boundary():
    bad = []
    for name in SOURCES:
        for target, _, line in _imports(name):
            top = target.split(".")[0]
            if top in MLX and _layer(name) in NO_MLX:
                bad.append(f"{SOURCES[name]}:{line}: {_layer(name)} imports {target}")
            if top in IMPORTERS and name not in IMPORTERS[top]:
                bad.append(f"{SOURCES[name]}:{line}: {target} is for {sorted(IMPORTERS[top])}")
    assert not bad, "\n".join(bad)


def test_only_mlxlm_reads_model_internals():
    reads = {m: _internal_reads(m) for m in SOURCES if m != "mlxsft._mlxlm"}
    bad = [
        f"{SOURCES[m]}:{lines}"
        for m, lines in reads.items()
        if lines and m not in ALLOWED_INTERNALS
    ]
    assert not bad, f"mlx-lm model internals {sorted(INTERNALS)} read outside _mlxlm: {bad}"
    fixed = sorted(m for m in ALLOWED_INTERNALS if not reads.get(m))
    assert not fixed, f"fixed, so remove them from ALLOWED_INTERNALS: {fixed}"


def test_names_come_from_their_defining_module():
    bad = [
        f"{SOURCES[name]}:{line}: {attr} is not defined in {target}"
        for name in SOURCES
        for target, attr, line in _imports(name)
        if attr is not None and target in SOURCES and attr not in _defined(target)
    ]
    assert not bad, "re-exports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {n: {t for t, _, _ in _imports(n) if t in SOURCES and t != n} for n in SOURCES}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += graph[node]
        return False

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and reaches(b, a))
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize(
    "source, rule",
    [
        ("from mlxsft.train.loop import train\n", "layer"),
        ("import mlx.core as mx\n", "heavy"),
        ("from transformers import AutoTokenizer\n", "heavy"),
        ("def f(model):\n    return model.model.embed_tokens\n", "internals"),
        ("from mlxsft.data.formats import Message\n", "re-export"),
        ("from mlxsft.data import batching\n", "cycle"),
    ],
)
def test_the_rules_catch_a_violation(monkeypatch, source, rule):
    """Each rule fails on a planted violation in data/ (so the checks above can fail)."""
    monkeypatch.setitem(TREES, "mlxsft.data.types", ast.parse(source))
    check = {
        "layer": test_layers_point_only_down,
        "heavy": test_heavy_libraries_stay_behind_their_boundary,
        "internals": test_only_mlxlm_reads_model_internals,
        "re-export": test_names_come_from_their_defining_module,
        "cycle": test_no_import_cycles,
    }[rule]
    with pytest.raises(AssertionError):
        check()
