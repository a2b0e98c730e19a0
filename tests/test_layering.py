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
