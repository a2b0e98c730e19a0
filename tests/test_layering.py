"""The import rule: library modules never import the command line (``esolm.cli``, ``esolm.commands``)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import esolm

SRC = Path(esolm.__file__).resolve().parent


def library_modules() -> dict[str, Path]:
    """Module name -> source file of every module under src/esolm except the command line."""
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if name == "esolm.cli" or name == "esolm.commands" or name.startswith("esolm.commands."):
            continue
        out[name] = f
    return out


def test_the_walk_finds_the_library():
    mods = library_modules()
    assert {"esolm", "esolm.evaluation.frontier", "esolm.evaluation.samples", "esolm.sampling.api",
            "esolm.devices"} <= set(mods)
    assert not any(m == "esolm.cli" or m.startswith("esolm.commands") for m in mods)


def test_importing_library_modules_never_loads_the_cli():
    """One fresh interpreter imports every library module in turn; after each, no CLI module is loaded."""
    script = (
        "import importlib, json, sys\n"
        "bad = {}\n"
        f"for name in {list(library_modules())!r}:\n"
        "    importlib.import_module(name)\n"
        "    cli = sorted(m for m in sys.modules if m == 'esolm.cli' or m.startswith('esolm.commands'))\n"
        "    if cli:\n"
        "        bad[name] = cli\n"
        "        break\n"
        "print(json.dumps(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}


def _imported_names(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):  # every import, also those inside functions
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_no_library_source_imports_the_cli_even_lazily():
    offenders = {}
    for name, f in library_modules().items():
        names = _imported_names(ast.parse(f.read_text()))
        hits = [n for n in names if n.startswith(("esolm.cli", "esolm.commands"))]
        if hits:
            offenders[name] = hits
    assert offenders == {}


# ---- the layer order: every library module imports only its own layer or those below it ----------------------
# (written down once here and in the README's layout table; a package's __init__ sits with its public API)
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["esolm.errors", "esolm.config", "esolm.devices"]),
    ("method", ["esolm.methods", "esolm.noise", "esolm.orders"]),
    ("network", ["esolm.model"]),
    ("persistence", ["esolm.io.atomic", "esolm.io.safe_pickle", "esolm.io.weights", "esolm.io.authors"]),
    ("objectives and decoding", ["esolm.objectives", "esolm.likelihood", "esolm.sampling"]),
    ("data and recipes", ["esolm.data", "esolm.recipes", "esolm.rl.tasks"]),  # rl.tasks: verifiable task data
    ("loading", ["esolm.io.pretrained", "esolm.io"]),
    ("applications", ["esolm.training", "esolm.evaluation", "esolm.rl", "esolm.serving", "esolm.integrations",
                      "esolm.demo"]),
    ("public API", ["esolm"]),
]


def layer_of(module: str) -> int:
    """Index of the most specific LAYERS prefix naming ``module``."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and the README)"
    return best


def import_graph() -> dict[str, set[str]]:
    """Module -> the library modules it imports (module-level and lazy imports; ``from pkg import sub`` names the
    submodule when ``sub`` is one)."""
    mods = library_modules()
    graph = {}
    for name, f in mods.items():
        deps = set()
        for n in _imported_names(ast.parse(f.read_text())):
            if n in mods:
                deps.add(n)
            elif n.rsplit(".", 1)[0] in mods and n.startswith("esolm"):
                deps.add(n.rsplit(".", 1)[0])
        deps.discard(name)
        graph[name] = deps
    return graph


def test_every_module_has_a_layer():
    for name in library_modules():
        layer_of(name)


def test_no_module_imports_a_layer_above_it():
    up = {}
    for name, deps in import_graph().items():
        if name == "esolm" or name.endswith("__init__"):
            continue
        bad = sorted(d for d in deps if layer_of(d) > layer_of(name) and not name.startswith(d + "."))
        if bad:
            up[name] = [f"{d} ({LAYERS[layer_of(d)][0]})" for d in bad]
    assert up == {}, up


def test_no_import_cycle_among_library_modules():
    graph = import_graph()
    # a package's __init__ re-exports its submodules: an edge from a submodule up to its own package is the
    # package's public face, not a dependency of the submodule on its siblings
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == [], cycles


def test_the_layer_rule_catches_an_upward_import():
    assert layer_of("esolm.model.backbone") < layer_of("esolm.io.pretrained")
    assert layer_of("esolm.io.weights") < layer_of("esolm.io.pretrained") < layer_of("esolm.serving.engine")
    assert layer_of("esolm.sampling.decoders") < layer_of("esolm.data.tokenizers")
