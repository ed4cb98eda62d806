"""The package's shape: imports flow one way (models -> transfer -> training -> api -> the faces),
with no cycle, and every module imports on its own."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "transmem"

# lower layers never import higher ones; a module may import its own layer or any lower one
LAYERS = [
    ("errors", "choices", "options", "environment", "files", "signals", "progress", "data", "metrics", "viz", "report_page", "baselines",
     "blend", "fullfield"),  # no models
    ("models",),
    ("transfer", "config"),
    # zoo entries, and ranking them for a target (probes train and evaluate); the report of loaded
    # forecasters (it draws what it is given and loads nothing, so api's evaluate and compare use it)
    ("training", "zoo", "run_report"),
    ("api",),
    ("predict", "demo", "bench", "cli"),  # the faces
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """transmem modules imported anywhere in ``path`` (top level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("transmem"):
                for alias in node.names:  # "from . import zoo" imports the module transmem.zoo
                    sub = f"{mod}.{alias.name}"
                    out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).is_file()
                            or (PKG.parent / sub.replace(".", "/")).is_dir() else mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("transmem")}
    return out - {name}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not placed in a layer of this test")


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph.get(m, ()):
            d = d if d in graph else d.rsplit(".", 1)[0]
            # importing a package runs its __init__; a module inside it importing the package
            # (``from . import x``) is not a cycle
            if m.startswith(d + "."):
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [d]))
            if state.get(d) is None:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_imports_flow_one_way():
    bad = []
    for m, deps in _graph().items():
        if m == "transmem":
            continue
        for d in deps:
            if d != "transmem" and _layer(d) > _layer(m):
                bad.append(f"{m} imports {d}")
    assert not bad, bad


def test_no_private_names_imported_across_modules():
    bad = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("transmem")):
                bad += [f"{_module_name(p)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


@pytest.mark.slow  # a fresh interpreter importing every module
def test_every_module_imports_alone():
    """Each module imported first, in a fresh set of transmem modules: an order-dependent cycle
    would fail here."""
    names = sorted(_graph())
    code = (
        "import sys, importlib\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    for k in [k for k in sys.modules if k == 'transmem' or k.startswith('transmem.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{n}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


#: modules allowed to import transmem modules inside functions, and why: what they import there
#: still counts in the layer and cycle checks above (``_imports`` reads function bodies too)
LAZY = {
    "transmem.cli": "the command line loads only what a command needs: --help, --version and "
                    "config errors answer without importing torch or Lightning",
    "transmem.config": "reading a config imports torch only when it names a model",
}


def test_no_function_local_imports_of_the_package():
    """Imports of transmem modules sit at the top of a file (a function-local one hides a cycle);
    only optional third-party dependencies may be imported inside functions, and the modules of
    ``LAZY`` for start-up time."""
    bad = []
    for p in PKG.rglob("*.py"):
        if _module_name(p) in LAZY:
            continue
        tree = ast.parse(p.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("transmem")):
                    bad.append(f"{_module_name(p)}:{node.lineno}")
                elif isinstance(node, ast.Import) and any(a.name.startswith("transmem") for a in node.names):
                    bad.append(f"{_module_name(p)}:{node.lineno}")
    assert not bad, bad
