"""The package's shape: imports point down a fixed stack of layers, never in a circle and never from inside a
function to dodge one; modules stay small; importing the package prints nothing."""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "diffusers_gac"

# A module may import from its own layer or below, never above. Within a layer, the import graph must be acyclic.
LAYERS = [
    ["config", "_quiet", "checks", "inputs", "layout"],
    ["quant", "sampling", "zoo", "denoisers"],
    ["calibration", "evaluation"],
    ["integration", "quantizer"],
    ["api", "saving", "hub", "pretrained"],
    ["cli"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_package.py; add it where it belongs")


def resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement of ``module`` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "diffusers_gac"]
    if node.level == 0:
        base = node.module or ""
        if base.split(".")[0] != "diffusers_gac":
            return []
    else:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    targets = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        targets.append(candidate if candidate in MODULES else base)
    return targets


def imports(module: str) -> tuple[set[str], list[str]]:
    """(package modules imported at module level, package imports found inside functions)."""
    tree = ast.parse(MODULES[module].read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)) and resolve(module, inner):
                    nested.append(f"{module}.{node.name}: {', '.join(resolve(module, inner))}")
    for node in tree.body:
        stack = [node]
        while stack:  # module-level statements, including those under `if`/`with`/`try`
            n = stack.pop()
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                top.update(resolve(module, n))
            elif not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                stack.extend(ast.iter_child_nodes(n))
    return top, nested


GRAPH = {m: imports(m)[0] - {m} for m in MODULES}


def test_no_module_imports_from_a_layer_above_it():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() if m != "diffusers_gac" for t in targets
              if t != "diffusers_gac" and layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_submodule_imports_the_top_level_package():
    assert [m for m, targets in GRAPH.items() if m != "diffusers_gac" and "diffusers_gac" in targets] == []


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in GRAPH:
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_cycle_check_finds_a_cycle():
    """The check above must be able to fail: a graph with a circle is caught."""
    saved = dict(GRAPH)
    try:
        GRAPH["diffusers_gac.config"] = saved["diffusers_gac.config"] | {"diffusers_gac.api"}
        with pytest.raises(AssertionError):
            test_the_import_graph_has_no_cycle()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_no_package_import_inside_a_function():
    assert [entry for m in MODULES for entry in imports(m)[1]] == []


def test_modules_stay_small():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}


# What importing bitsandbytes (the bnb and peers extras) prints on a CPU with AVX512-BF16: its best-effort
# lookup of a Hub kernel through the ``kernels`` package fails without the Hub, and offline ``kernels`` says it
# skips the publisher check first.
IMPORT_NOISE = ("Failed to load CPU gemm_4bit_forward", "Skipping publisher trust check")
BNB = importlib.util.find_spec("bitsandbytes") is not None
DIFFUSERS_FIRST = "from diffusers import UNet2DModel; import diffusers_gac"


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline"])
@pytest.mark.parametrize("code", ["import diffusers_gac", "import diffusers_gac.cli",
                                  "import diffusers_gac; from diffusers import UNet2DModel",
                                  pytest.param(DIFFUSERS_FIRST, marks=pytest.mark.skipif(
                                      BNB, reason="with bitsandbytes installed, diffusers' own import of it logs "
                                      "before diffusers-gac is imported; a plain install has no bitsandbytes"))])
def test_importing_prints_nothing(code, offline):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | ({"HF_HUB_OFFLINE": "1"} if offline else {})
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    printed = result.stdout + result.stderr
    assert [noise for noise in IMPORT_NOISE if noise in printed] == []
    assert result.returncode == 0 and printed == "", printed


def test_cli_help_prints_only_help():
    result = subprocess.run([sys.executable, "-m", "diffusers_gac.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "" and result.stdout.startswith("usage: diffusers-gac")
