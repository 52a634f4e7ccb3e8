"""The layout of the code: each module lives in a room whose `__init__` docstring names it, dependencies between
rooms run one way, no room holds more than a third of the code, no import circle is left, and the old import paths
kept for users still give the same objects.

The import graph is read statically (every `import` statement of every module, those inside functions included:
a lazy import is still a dependency), so the test needs no optional package (vLLM, Qdrant, mteb) installed.
"""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("metaembed", "modeling_metaembed", "training", "model_cards")  # folders of the repository
# Installed names of the folders whose own name a user's project is likely to have (pyproject.toml's package-dir).
INSTALLED_AS = {"training": "metaembed_training", "model_cards": "metaembed_model_cards"}


def module_name(path: Path) -> str:
    """The installed module name of a first-party file (or of the package folder holding a non-Python file)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[0] = INSTALLED_AS.get(parts[0], parts[0])
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def folder_of(room: str) -> str:
    """The repository folder of a room."""
    top, _, rest = room.partition(".")
    folder = next((name for name, installed in INSTALLED_AS.items() if installed == top), top)
    return "/".join([folder, *rest.split(".")]) if rest else folder


# Each room and the first-party rooms its modules may import (besides itself). The top of `metaembed` (the command
# line, and the re-exports of old paths) may import everything.
ROOMS = {
    "modeling_metaembed": set(),
    "metaembed_training": {"modeling_metaembed"},
    "metaembed_model_cards": {"modeling_metaembed"},
    "metaembed.retrieval": {"modeling_metaembed"},
    "metaembed.serving": {"modeling_metaembed", "metaembed.retrieval"},
    "metaembed.evals": {"modeling_metaembed", "metaembed_training", "metaembed.retrieval"},
    "metaembed.quickstart": {"modeling_metaembed", "metaembed_training", "metaembed_model_cards"},
    "metaembed.hub": {"modeling_metaembed", "metaembed_model_cards"},
}
ROOMS["metaembed"] = set(ROOMS)

# Circles left on purpose, each as a set of module names with a comment giving its reason (none at present).
KNOWN_CIRCLES: list = []

# Old import paths kept for users: (old module, new module, names that must be the same objects).
REEXPORTS = [
    ("metaembed.index", "metaembed.retrieval.index", ["MetaEmbedIndex", "SearchResult", "IndexFileError", "quantize"]),
    ("metaembed.qdrant", "metaembed.retrieval.qdrant", ["QdrantMetaEmbedIndex", "Edge", "point_id"]),
    ("metaembed.scan_kernel", "metaembed.retrieval.scan_kernel", ["choose", "top_k", "work_bytes", "compiled", "main"]),
    ("metaembed.backbones", "metaembed.quickstart.backbones", ["build_litevl", "pretrained_efficientnet_lite"]),
]


def module_files() -> dict:
    """{module name: path} of every first-party Python module."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


MODULES = module_files()


def imported_modules(name: str, path: Path) -> set:
    """The first-party modules `name` imports, wherever the statement is (module level, function, try block)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from package import module` imports the module; `from module import name` the module itself
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` of a name inside a module: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def room_of(module: str) -> str:
    """The room of a module: the longest room name it sits in."""
    return max((room for room in ROOMS if module == room or module.startswith(room + ".")), key=len)


def circles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_no_import_circle_is_left():
    assert [sorted(c) for c in circles(GRAPH) if c not in KNOWN_CIRCLES] == []


def test_the_circle_finder_finds_circles_through_lazy_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [{"a", "b", "c"}]


def test_rooms_import_only_the_rooms_below_them():
    wrong = []
    for module, targets in GRAPH.items():
        room = room_of(module)
        for target in targets:
            other = room_of(target)
            if other != room and other not in ROOMS[room]:
                wrong.append(f"{module} ({room}) imports {target} ({other})")
    assert wrong == []


def test_every_module_is_named_by_its_rooms_docstring():
    unnamed = []
    for module, path in MODULES.items():
        if path.name == "__init__.py" and module in ROOMS:
            continue
        room = room_of(module)
        docstring = ast.get_docstring(ast.parse(MODULES[room].read_text(encoding="utf-8"))) or ""
        short = module[len(room) + 1 :].split(".")[0]  # a subpackage is named by its folder
        if not re.search(rf"\b{re.escape(short)}\b", docstring):
            unnamed.append(f"{module} is not named in {MODULES[room].relative_to(ROOT)}")
    assert unnamed == []


def test_no_room_holds_more_than_a_third_of_the_code():
    lines = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if path.suffix in (".py", ".cpp") and path.is_file():
                module = module_name(path) if path.suffix == ".py" else module_name(path.parent.parent / "x.py")
                room = room_of(module.rpartition(".")[0] if path.suffix != ".py" else module)
                lines[room] = lines.get(room, 0) + len(path.read_text(encoding="utf-8").splitlines())
    total = sum(lines.values())
    assert {room: f"{count / total:.0%}" for room, count in lines.items() if count > total / 3} == {}


@pytest.mark.parametrize("old, new, names", REEXPORTS, ids=[r[0] for r in REEXPORTS])
def test_old_import_paths_give_the_same_objects(old, new, names):
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    assert [name for name in names if getattr(old_module, name) is not getattr(new_module, name)] == []


def readme_layout_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## Layout of the repository", 1)[1].split("\n## ", 1)[0]


def test_the_readmes_layout_section_matches_the_tree():
    """Every path the README's layout names exists, and it names every room and every top-level folder."""
    section = readme_layout_section()
    named = set(re.findall(r"`([\w./*-]+)`", section))
    paths = {name for name in named if "/" in name or name.endswith(".py")}
    missing = []
    for name in paths:
        if "*" in name:
            continue
        candidates = [ROOT / name] + [path for path in ROOT.rglob(name) if ".venv" not in path.parts]
        if not any(path.exists() for path in candidates):
            missing.append(name)
    assert missing == []
    rooms = {folder_of(room) + "/" for room in ROOMS}
    folders = {f"{path.name}/" for path in ROOT.iterdir() if path.is_dir() and (path / "__init__.py").exists()}
    folders |= {"examples/", "benchmarks/", "tests/", "docs/"}
    assert sorted((rooms | folders) - named) == []


def test_the_build_configuration_installs_every_package_folder():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    folders = {name: folder for name, folder in setuptools["package-dir"].items()}
    assert folders == {installed: folder for folder, installed in INSTALLED_AS.items()}
    expected = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if (
                path.is_dir()
                and "__pycache__" not in path.parts
                and (any(path.glob("*.py")) or path.name in ("recipes", "accelerate"))
            ):
                expected.add(module_name(path / "x.py").rpartition(".")[0])
        expected.add(INSTALLED_AS.get(package, package))
    expected.discard("metaembed.retrieval.csrc")
    assert sorted(expected ^ set(setuptools["packages"])) == []
