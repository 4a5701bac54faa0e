"""The import arrows of python/h2rec point one way, down the layer table below.

Every module of the package belongs to a layer of ``LAYERS`` (the row of its longest listed
prefix: ``h2rec.data.readers`` is in the row of ``h2rec.data``). A module may import modules of
its own layer and of the layers below it, never one above. The imports are read from the source
with ``ast``, all of them: at module level, inside functions (lazy imports), and under
``if TYPE_CHECKING:`` (a typing-only arrow is an arrow too). The whole import graph must also be
free of cycles, within a layer as well. A new module without a row fails until it gets one.

Only imports written as ``import``/``from ... import`` statements are seen (not
``importlib.import_module("h2rec...")``). The one such import is the package's facade:
``h2rec.fit``, ``h2rec.load`` and the like resolve on first use (``h2rec.__getattr__``), so that
``import h2rec`` stays light; no module of the package uses them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "h2rec"

# lowest first: each row may import its own row and the rows above it in this list
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundations",  # the Rust core, errors, tensor ops, threads, output files
        ("h2rec", "h2rec._core", "h2rec.errors", "h2rec.ops", "h2rec.threads", "h2rec.outputs"),
    ),
    (
        "data and losses",  # datasets, item text embeddings, Semantic IDs, the losses
        ("h2rec.data", "h2rec.synthetic", "h2rec.embed", "h2rec.semantic_ids", "h2rec.losses"),
    ),
    ("models", ("h2rec.models",)),
    (
        "training and evaluation",  # the run configuration, reports, evaluation, training
        ("h2rec.config", "h2rec.report", "h2rec.evaluate", "h2rec.blend", "h2rec.train"),
    ),
    (
        "pipeline and serving",  # the end-to-end run, a trained recommender, a run's inputs
        ("h2rec.pipeline", "h2rec.serving", "h2rec.runs"),
    ),
    ("command line", ("h2rec.cli", "h2rec.cli_data")),
]


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the row with the longest prefix of ``module`` (None: no row)."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # the root package is listed for its own __init__ only, not as a catch-all
            matches = module == prefix or (prefix != "h2rec" and module.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> source file of every module of the package (stubs of compiled modules,
    such as ``_core.pyi``, name a module too)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi") or "__pycache__" in path.parts:
            continue
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if path.suffix == ".py" or name not in found:
            found[name] = path
    return found


def _resolve(name: str, known: Iterable[str]) -> str:
    """The longest known module that ``name`` is or lies in (``h2rec.models.Recommender`` ->
    ``h2rec.models``)."""
    parts = name.split(".")
    known = set(known)
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) if parts else name


def imports(
    module: str, source: str, known: Iterable[str], is_package: bool = False
) -> Iterator[tuple[int, str]]:
    """(line, imported h2rec module) for every import statement of ``source``, wherever it is
    (``is_package``: ``source`` is the ``__init__.py`` of ``module``)."""
    known = set(known)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "h2rec" or alias.name.startswith("h2rec."):
                    yield node.lineno, _resolve(alias.name, known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 packages
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            if base != "h2rec" and not base.startswith("h2rec."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield node.lineno, sub if sub in known else _resolve(base, known)


def graph(root: Path = PACKAGE) -> dict[str, list[tuple[int, str]]]:
    """Module -> its (line, imported module) arrows."""
    found = modules(root)
    return {
        name: list(imports(name, path.read_text(encoding="utf8"), found,
                           is_package=path.name == "__init__.py"))
        for name, path in found.items()
        if path.suffix == ".py"
    }


def layer_violations(arrows: dict[str, list[tuple[int, str]]]) -> list[str]:
    bad = []
    for module, targets in sorted(arrows.items()):
        here = layer_of(module)
        for line, target in targets:
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                bad.append(
                    f"{module}:{line} ({LAYERS[here][0]}) imports {target} "
                    f"({LAYERS[there][0]}), a higher layer"
                )
    return bad


def cycles(arrows: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Import cycles, each as the list of its modules. Importing ``a.b.c`` also runs the
    packages ``a.b`` and ``a`` (unless they contain the importer, which Python runs first)."""
    edges: dict[str, set[str]] = {m: set() for m in arrows}
    for module, targets in arrows.items():
        for _, target in targets:
            edges[module].add(target)
            parts = target.split(".")[:-1]
            while parts:
                parent = ".".join(parts)
                if not module.startswith(parent + ".") and parent in arrows:
                    edges[module].add(parent)
                parts.pop()
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if n == m:
                continue
            if state.get(n) == 1:
                found.append(path[path.index(n):] + [n])
            elif n in edges and n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


# --------------------------------------------------------------------------- the package


def test_every_module_has_a_layer() -> None:
    found = modules()
    assert {"h2rec.losses", "h2rec.models.h2rec", "h2rec.train.loop", "h2rec.data"} <= set(found)
    missing = sorted(m for m in found if layer_of(m) is None)
    assert not missing, f"modules without a row in LAYERS (tests/test_layering.py): {missing}"


def test_imports_point_down_the_layers() -> None:
    bad = layer_violations(graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_losses_import_nothing_of_the_models_or_above() -> None:
    arrows = graph()
    losses = layer_of("h2rec.losses")
    assert losses is not None
    below = {m for m in modules() if (layer := layer_of(m)) is not None and layer <= losses}
    assert {t for _, t in arrows["h2rec.losses"]} <= below


# --------------------------------------------------------------------------- the checker itself

KNOWN = ["h2rec", "h2rec.losses", "h2rec.errors", "h2rec.models", "h2rec.models.h2rec",
         "h2rec.data", "h2rec.data.readers", "h2rec.data.files", "h2rec._core"]


@pytest.mark.parametrize(
    "source",
    [
        "import h2rec.models\n",
        "def f():\n    from h2rec.models import build_model\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from h2rec.models import X\n",
        "from h2rec.models.h2rec import H2Rec\n",
        "from h2rec import models\n",
    ],
)
def test_an_upward_import_is_caught(source: str) -> None:
    arrows = {"h2rec.losses": list(imports("h2rec.losses", source, KNOWN))}
    assert layer_violations(arrows), source


def test_relative_and_sideways_imports_resolve() -> None:
    src = "from . import files\nfrom .files import _check_file\nfrom h2rec import _core\n"
    found = {t for _, t in imports("h2rec.data.readers", src, KNOWN)}
    assert found == {"h2rec.data.files", "h2rec._core"}
    assert not layer_violations({"h2rec.data.readers": [(1, t) for t in sorted(found)]})


def test_a_cycle_is_caught() -> None:
    arrows = {
        "h2rec.losses": [(1, "h2rec.models.h2rec")],
        "h2rec.models": [(1, "h2rec.models.h2rec")],
        "h2rec.models.h2rec": [(1, "h2rec.losses")],
    }
    assert cycles(arrows)
    # a submodule importing a sibling runs its own package first: not a cycle
    assert not cycles({"h2rec.data": [(1, "h2rec.data.readers")],
                       "h2rec.data.readers": [(1, "h2rec.data.files")],
                       "h2rec.data.files": []})
