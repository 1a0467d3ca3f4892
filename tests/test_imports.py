"""The package's module graph: no import cycles (not even through imports inside functions), every module
importable on its own, and a command line that answers --help without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pixrun

SOURCE = Path(pixrun.__file__).parent
HEAVY = ("torch", "transformers", "diffusers")


def module_names() -> list[str]:
    names = []
    for path in sorted(SOURCE.rglob("*.py")):
        parts = ("pixrun", *path.relative_to(SOURCE).with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_modules(name: str, modules: set[str]) -> set[str]:
    """The pixrun modules that importing `name` runs, through any import statement in it (also inside
    functions): each named module, and the packages above it that `name` is not itself inside."""
    path = SOURCE.joinpath(*name.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets.add(node.module)
            targets.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from package import module`
    found = set()
    for target in targets & modules:
        parts = target.split(".")
        packages = (".".join(parts[:i]) for i in range(2, len(parts)))
        found.update(package for package in packages if not name.startswith(package + "."))
        found.add(target)
    return found - {name}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, as the modules along it, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":  # on the path that led here
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_module_graph_has_no_cycle():
    modules = set(module_names())
    graph = {name: imported_modules(name, modules) for name in modules}
    assert "pixrun.config" in graph["pixrun.pipeline"]  # the graph sees imports
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_runtime_and_errors_import_nothing_of_pixrun():
    modules = set(module_names())
    assert imported_modules("pixrun.runtime", modules) == set()
    assert imported_modules("pixrun.errors", modules) == set()


def test_every_module_imports_first():
    """In one interpreter: each module imported while no other module of pixrun is loaded."""
    script = (
        "import importlib, sys\n"
        f"for name in {module_names()!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'pixrun' or m.startswith('pixrun.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def test_help_imports_no_torch():
    script = (
        "import sys\n"
        "from pixrun.cli import main\n"
        "for argv in (['--help'], ['bench', '--help'], ['plan', '--help'], ['train', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted(set(sys.modules) & {set(HEAVY)!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "usage: pixrun bench" in result.stdout and "--compare-diffusers" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"
