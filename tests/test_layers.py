"""The layers of imr_model point one way (#20). The sources are read with `ast`: nothing is imported.

(a) no import cycles between imr_model modules, counting imports anywhere in a file;
(b) imr_model never imports the top-level `train` scripts (they sit above the library);
(c) an imr_model import inside a function is listed in ALLOWED_INNER with the reason it cannot be at the top;
(d) no core module (one that inference, experiment or scoring reach through module-top imports) imports a
    package of an optional extra at its top, so the core install imports without the extras.
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass
from pathlib import Path

import networkx as nx  # installed with torch (a core dependency)

PACKAGE = "imr_model"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
TODO = "TODO #20 redesign in progress"
CLI_STARTUP = "CLI start-up: a command imports the stage it runs (`imr --help`, `imr parse`: ~0.1 s, not torch + MLflow's ~4 s)"

#: (module, imported module) → why that import sits inside a function. Names are relative to imr_model
#: ("cli" is imr_model.cli; "imr_model" is the package's __init__). A TODO entry whose import is gone
#: only warns (the #20 work is removing them); any other entry whose import is gone fails.
ALLOWED_INNER: dict[tuple[str, str], str] = {
    ('cli', 'dataset'): CLI_STARTUP,
    ('cli', 'demo'): CLI_STARTUP,
    ('cli', 'drift'): CLI_STARTUP,
    ('cli', 'evaluation'): CLI_STARTUP,
    ('cli', 'experiment'): CLI_STARTUP,
    ('cli', 'inference'): CLI_STARTUP,
    ('cli', 'modelcard'): CLI_STARTUP,
    ('cli', 'onnx_backend'): CLI_STARTUP,
    ('cli', 'registry'): CLI_STARTUP,
    ('cli', 'report'): CLI_STARTUP,
    ('cli', 'review'): CLI_STARTUP,
    ('cli', 'score_output'): CLI_STARTUP,
    ('cli', 'scoring'): CLI_STARTUP,
    ('cli', 'serving'): CLI_STARTUP,
    ('cli', 'spark'): CLI_STARTUP,
    ('cli', 'tabular'): CLI_STARTUP,
    ('cli', 'tracking'): CLI_STARTUP,
    ("tracking", "pyfunc_model"): "importing pyfunc_model loads MLflow's pyfunc and runs set_model (the "
                                  "models-from-code hook); only logging a model needs it",
    ("serving_pool", "serving_worker"): "the worker module loads torch and the model stack; the server process that imports serving_pool must stay light (it only parses requests), so only the worker processes import it",
}

#: pip extra → the import names of its packages (pyproject.toml, [project.optional-dependencies]).
OPTIONAL_EXTRAS = {
    "spark": ("pyspark",),
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "serve": ("fastapi", "fastapi_offline", "uvicorn", "python_multipart", "multipart"),
}
CORE_ROOTS = ("inference", "experiment", "scoring")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, relative to imr_model
    target: str  # the absolute dotted name imported: "torch.nn", "imr_model.modeling.IMRClassifier"
    line: int
    inner: bool  # inside a function: runs on call, not on import
    type_only: bool  # under `if TYPE_CHECKING:`: never runs


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        out[".".join(parts) or PACKAGE] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, path: Path):
        self.module, self.found = module, []
        qualname = PACKAGE if module == PACKAGE else f"{PACKAGE}.{module}"
        self.package = qualname.split(".") if path.name == "__init__.py" else qualname.split(".")[:-1]
        self.functions = self.type_only = 0

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.functions += 1
        self.generic_visit(node)
        self.functions -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            return self.generic_visit(node)
        self.type_only += 1
        for child in node.body:
            self.visit(child)
        self.type_only -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package, one level up per extra dot
            package = self.package[: len(self.package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        for alias in node.names:
            self._add(base if alias.name == "*" else f"{base}.{alias.name}", node)

    def _add(self, target: str, node: ast.stmt) -> None:
        self.found.append(Import(self.module, target, node.lineno, self.functions > 0, self.type_only > 0))


def _collect() -> list[Import]:
    found = []
    for module, path in MODULES.items():
        visitor = _Imports(module, path)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found += visitor.found
    return found


IMPORTS = _collect()


def _own(target: str) -> str | None:
    """The imr_model module `target` names (the longest module prefix), or None for other packages."""
    parts = target.split(".")
    if parts[0] != PACKAGE:
        return None
    for n in range(len(parts), 1, -1):
        name = ".".join(parts[1:n])
        if name in MODULES:
            return name
    return PACKAGE


def _graph(*, top_only: bool) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for imp in IMPORTS:
        target = _own(imp.target)
        if target is None or target == imp.module or (top_only and (imp.inner or imp.type_only)):
            continue
        if not graph.has_edge(imp.module, target):
            graph.add_edge(imp.module, target, lines=[])
        graph.edges[imp.module, target]["lines"].append(imp.line)
    return graph


def test_the_package_is_read():
    assert set(CORE_ROOTS) <= set(MODULES), f"a core root is gone; update CORE_ROOTS: {sorted(MODULES)}"
    assert ("inference", "letters") in _graph(top_only=True).edges


def test_no_import_cycles():
    graph = _graph(top_only=False)
    problems = []
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1:
            cycle = nx.find_cycle(graph.subgraph(component))
            path = " -> ".join(f"{a}:{graph.edges[a, b]['lines'][0]}" for a, b in cycle) + f" -> {cycle[0][0]}"
            problems.append(f"{sorted(component)}, e.g. {path}")
    assert not problems, "import cycles between imr_model modules:\n  " + "\n  ".join(problems)


def test_no_module_imports_the_train_scripts():
    bad = [f"{i.module}:{i.line} imports {i.target}" for i in IMPORTS if i.target.split(".")[0] == "train"]
    assert not bad, "imr_model must not import the top-level train package:\n  " + "\n  ".join(bad)


def test_inner_imports_are_allowlisted():
    found: dict[tuple[str, str], set[int]] = {}
    for imp in IMPORTS:
        target = _own(imp.target)
        if imp.inner and target is not None and target != imp.module:
            found.setdefault((imp.module, target), set()).add(imp.line)
    assert all(isinstance(r, str) and r.strip() for r in ALLOWED_INNER.values()), "every entry needs a reason"
    unexplained = [
        f"{m} imports {t} inside a function (lines {sorted(found[m, t])})" for m, t in sorted(set(found) - set(ALLOWED_INNER))
    ]
    assert not unexplained, (
        "move these imports to the module top, or add them to ALLOWED_INNER with the reason they cannot be:\n  "
        + "\n  ".join(unexplained)
    )
    stale = sorted(set(ALLOWED_INNER) - set(found))
    gone = [key for key in stale if ALLOWED_INNER[key] != TODO]
    assert not gone, f"these ALLOWED_INNER entries no longer match an import; remove them: {gone}"
    if stale:
        warnings.warn(f"ALLOWED_INNER TODO entries whose import is gone (remove them): {stale}", stacklevel=1)


def test_core_modules_do_not_import_optional_extras_at_top():
    graph = _graph(top_only=True)
    core = {PACKAGE, *CORE_ROOTS}  # the package's __init__ runs before any of its modules
    for root in CORE_ROOTS:
        core |= nx.descendants(graph, root)
    extra_of = {name: extra for extra, names in OPTIONAL_EXTRAS.items() for name in names}
    bad = [
        f"{i.module}:{i.line} imports {i.target} ([{extra_of[i.target.split('.')[0]]}] extra) at module top"
        for i in IMPORTS
        if i.module in core and not (i.inner or i.type_only) and i.target.split(".")[0] in extra_of
    ]
    assert not bad, "core modules import optional extras only where they use them:\n  " + "\n  ".join(bad)
