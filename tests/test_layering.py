"""Layering: which of our modules may import which, read from the sources with ``ast`` (nothing is imported).

Every ``import`` statement counts, at module level and inside functions (a cycle hidden by a function-level
import is still a cycle; only its timing differs). Relative imports are resolved. ``from pkg import name``
is an edge to ``pkg.name`` when that is one of our modules, else to ``pkg`` (its ``__init__``). Dynamic
imports (``importlib.import_module(variable)``) are not seen.

The rules, in one table. A rule's ``source`` and ``forbidden`` entries are module names; an entry matches
the module itself and everything under it (``grpc`` matches ``grpc.aio``), ``*`` is a wildcard
(``grpc_*`` matches ``grpc_health.v1``). A forbidden import is looked for in everything the source imports,
directly or through other modules of ours (the report shows the path with file:line of every hop); importing
a module also runs its parent packages' ``__init__``, which counts.
"""
from __future__ import annotations

import ast
import fnmatch
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent

# folder -> the module name it installs as
TREES = {
    "services": "epserve.services",
    "kernels": "epserve.kernels",
    "load_tests": "epserve.load_tests",
    "sdk/epserve_client": "epserve_client",
}

NETWORK = ("grpc", "grpc_*", "redis", "epserve.services.proto", "epserve.services.cluster", "epserve.services.router",
           "epserve.services.attention", "epserve.services.expert", "epserve.load_tests", "epserve_client")

# (source, forbidden imports, why)
RULES = [
    ("epserve.services.model", NETWORK,
     "the model is math: loadable and testable without any network code"),
    ("epserve.kernels", NETWORK,
     "kernels are math: loadable and testable without any network code"),
    ("epserve.kernels", ("epserve.services",),
     "kernels sit below the services: the model imports kernels, never the other way"),
    ("epserve_client", ("epserve", "torch", "numpy"),
     "the SDK needs only grpcio and protobuf (sdk/pyproject.toml), never the server"),
    ("epserve.services.engine", ("epserve.services.router", "epserve.services.attention", "epserve.services.expert",
                                 "grpc", "grpc_*", "redis"),
     "the engine runs in one process (epserve generate); the services wrap it, not the other way"),
]

# The top-level names these folders had before they moved under `epserve.`; no import may use them.
OLD_TOP_LEVEL = ("services", "kernels", "load_tests")
OLD_NAME_TREES = ("services", "kernels", "load_tests", "sdk/epserve_client", "benchmarks", "scripts", "tests")


# ---- the checker -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    module: str
    file: str          # shown in messages
    text: str
    is_package: bool   # an __init__.py


@dataclass(frozen=True)
class Import:
    source: str        # importing module
    target: str        # imported module: one of ours when it is one, else the dotted name as written
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} -> {self.target}"


def sources_under(root: Path, trees: dict[str, str]) -> dict[str, Source]:
    """Every .py file of the trees, by module name."""
    found = {}
    for folder, prefix in trees.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            module = ".".join((prefix, *(parts[:-1] if is_package else parts)))
            found[module] = Source(module, str(path.relative_to(root)), path.read_text(), is_package)
    return found


def written_imports(source: Source) -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) of every import statement, relative ones resolved; ``from m import a, b``
    gives (m, a) and (m, b), ``import m`` gives (m, None)."""
    found = []
    for node in ast.walk(ast.parse(source.text, source.file)):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = source.module.split(".") if source.is_package else source.module.split(".")[:-1]
                base = package[:len(package) - (node.level - 1)]
                assert len(base) == len(package) - (node.level - 1) and base, \
                    f"{source.file}:{node.lineno}: relative import beyond the top-level package"
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found += [(module, alias.name, node.lineno) for alias in node.names]
    return found


def import_edges(sources: dict[str, Source]) -> list[Import]:
    """Every import of every source, resolved to our modules where it names one."""
    edges = []
    for source in sources.values():
        for module, name, line in written_imports(source):
            target = module
            if name is not None and f"{module}.{name}" in sources:
                target = f"{module}.{name}"              # from pkg import submodule
            if target != source.module:
                edges.append(Import(source.module, target, source.file, line))
    return edges


def _graph(edges: list[Import], modules) -> dict[str, list[Import]]:
    graph = {m: [] for m in modules}
    for edge in edges:
        if edge.target in graph:
            graph[edge.source].append(edge)
    return graph


def _components(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for edge in children:
                child = edge.target
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def _shortest_path(graph, start: str, goal_edges, allowed=None) -> list[Import] | None:
    """Shortest chain of edges from ``start`` to an edge accepted by ``goal_edges`` (breadth first)."""
    came_by: dict[str, Import | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for edge in graph[node]:
            if goal_edges(edge):
                path, at = [edge], node
                while came_by[at] is not None:
                    path.append(came_by[at])
                    at = came_by[at].source
                return path[::-1]
            if edge.target in graph and edge.target not in came_by and (allowed is None or edge.target in allowed):
                came_by[edge.target] = edge
                queue.append(edge.target)
    return None


def _show(path: list[Import]) -> str:
    return " -> ".join([path[0].source] + [e.target for e in path]) + "".join(f"\n      {e}" for e in path)


def cycles(sources: dict[str, Source], edges: list[Import]) -> list[str]:
    """One message per import cycle: its modules, and a shortest cycle through each of them as a path."""
    graph = _graph(edges, sources)
    messages = []
    for component in _components(graph):
        members = set(component)
        shown = []
        for module in component:
            path = _shortest_path(graph, module, lambda e, m=module: e.target == m, members)
            key = frozenset(e for e in path)
            if key not in {frozenset(p) for p in shown}:
                shown.append(path)
        messages.append(f"import cycle among {', '.join(component)}:\n  "
                        + "\n  ".join(_show(path) for path in shown))
    return messages


def _matches(module: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(module, pattern + ".*")


def _with_parent_packages(sources: dict[str, Source], edges: list[Import]) -> list[Import]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first: edges to those, for reachability."""
    implied = []
    for edge in edges:
        parts = edge.target.split(".")
        for n in range(1, len(parts)):
            parent = ".".join(parts[:n])
            if parent in sources and parent != edge.source:
                implied.append(Import(edge.source, parent, edge.file, edge.line))
    return edges + implied


def forbidden_imports(sources: dict[str, Source], edges: list[Import], rules=RULES) -> list[str]:
    """One message per (rule, module of its source) that reaches a forbidden import, with the path."""
    graph = _graph(_with_parent_packages(sources, edges), sources)
    for edge in edges:
        if edge.target not in sources:
            graph[edge.source].append(edge)             # outside modules are leaves
    messages = []
    for source, forbidden, why in rules:
        for module in sorted(m for m in sources if _matches(m, source)):
            def is_forbidden(edge, source=source):
                return any(_matches(edge.target, f) for f in forbidden) and not _matches(edge.target, source)
            path = _shortest_path(graph, module, is_forbidden)
            if path:
                messages.append(f"{source} must not import {', '.join(forbidden)} ({why}); "
                                f"{module} imports {path[-1].target}:\n  {_show(path)}")
    return messages


def old_top_level_imports(sources: dict[str, Source]) -> list[str]:
    """Absolute imports of ``services``, ``kernels``, ``load_tests`` (the names before ``epserve.``)."""
    messages = []
    for source in sources.values():
        for node in ast.walk(ast.parse(source.text, source.file)):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            messages += [f"{source.file}:{node.lineno}: imports {name}; it is epserve.{name} now"
                         for name in names if name.split(".")[0] in OLD_TOP_LEVEL]
    return messages


# ---- the tests ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ours():
    sources = sources_under(ROOT, TREES)
    return sources, import_edges(sources)


def test_the_trees_are_read(ours):
    sources, edges = ours
    assert {"epserve.services.cli", "epserve.services.model", "epserve.kernels.fused_moe", "epserve.load_tests.cli",
            "epserve_client", "epserve_client._proto.generation_pb2"} <= set(sources)
    assert any(e.target == "epserve.services.model.config" for e in edges)
    for source, _, _ in RULES:
        assert any(_matches(m, source) for m in sources), f"rule for {source}, which no module matches"


def test_no_import_cycles(ours):
    sources, edges = ours
    found = cycles(sources, edges)
    if found:
        pytest.fail("\n".join(found), pytrace=False)


def test_no_forbidden_imports(ours):
    sources, edges = ours
    found = forbidden_imports(sources, edges)
    if found:
        pytest.fail("\n".join(found), pytrace=False)


def test_no_imports_of_the_old_top_level_names():
    found = old_top_level_imports(sources_under(ROOT, {tree: tree.replace("/", ".") for tree in OLD_NAME_TREES}))
    if found:
        pytest.fail("\n".join(found), pytrace=False)


# ---- the checker catches what it should (so the tests above can fail) ---------------------------------------
def _synthetic(files: dict[str, str]) -> dict[str, Source]:
    """Sources from {"pkg/mod.py": text}: module names as for a tree rooted at the top of the paths."""
    sources = {}
    for file, text in files.items():
        parts = file.removesuffix(".py").split("/")
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        sources[module] = Source(module, file, text, is_package)
    return sources


SYNTHETIC = {
    "epserve/services/__init__.py": "",
    "epserve/services/cli.py": "import argparse\nfrom epserve.services.up_cmd import run\n",
    "epserve/services/up_cmd.py": "import os\n\ndef run():\n    from .cli import UsageError\n",
    "epserve/services/model/__init__.py": "",
    "epserve/services/model/config.py": "import torch\nfrom . import layers\n",
    "epserve/services/model/layers.py": "def f():\n    from ..params import x\n",
    "epserve/services/params.py": "def g():\n    import grpc.aio\n",
    "epserve/services/engine/__init__.py": "from epserve.services.model import config\n",
    "services/old.py": "import services.cli\nfrom kernels import fused_moe\nfrom .kernels import fine\nimport epserve.kernels\n",
}


def test_checker_finds_a_cycle_through_a_function_level_relative_import():
    sources = _synthetic(SYNTHETIC)
    edges = import_edges(sources)
    assert Import("epserve.services.up_cmd", "epserve.services.cli", "epserve/services/up_cmd.py", 4) in edges
    assert Import("epserve.services.model.config", "epserve.services.model.layers",
                  "epserve/services/model/config.py", 2) in edges          # from . import <submodule>
    (message,) = cycles(sources, edges)
    assert message.startswith("import cycle among epserve.services.cli, epserve.services.up_cmd:")
    assert "epserve.services.cli -> epserve.services.up_cmd -> epserve.services.cli" in message
    assert "epserve/services/up_cmd.py:4: epserve.services.up_cmd -> epserve.services.cli" in message


def test_checker_finds_a_forbidden_import_through_another_module():
    sources = _synthetic(SYNTHETIC)
    found = forbidden_imports(sources, import_edges(sources))
    model = [m for m in found if m.startswith("epserve.services.model must not")]
    assert len(model) == 2                          # config (through layers) and layers
    assert ("epserve.services.model.config -> epserve.services.model.layers -> epserve.services.params -> grpc.aio\n"
            "      epserve/services/model/config.py:2: epserve.services.model.config -> epserve.services.model.layers\n"
            "      epserve/services/model/layers.py:2: epserve.services.model.layers -> epserve.services.params\n"
            "      epserve/services/params.py:2: epserve.services.params -> grpc.aio") in model[0]
    engine = [m for m in found if m.startswith("epserve.services.engine must not")]
    assert len(engine) == 1 and "epserve.services.engine imports grpc.aio" in engine[0]
    assert not [m for m in found if m.startswith(("epserve.kernels", "epserve_client"))]
    assert not forbidden_imports(sources, import_edges(sources), [("epserve.services.model", ("redis",), "")])


def test_checker_finds_old_top_level_names():
    assert old_top_level_imports(_synthetic(SYNTHETIC)) == [
        "services/old.py:1: imports services.cli; it is epserve.services.cli now",
        "services/old.py:2: imports kernels; it is epserve.kernels now",
    ]
