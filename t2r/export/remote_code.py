"""Flat modeling files for an export, generated from t2r's own sources (one copy of the code).

``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads the files named in
``config.json``'s ``auto_map`` (``configuration_t2r.py``, ``modeling_t2r.py``) and, recursively,
every file they import as ``from .name import ...``. So the export holds one flat file per t2r
module the model imports (``t2r.models.*``, ``t2r.layers.*``, ``t2r.kernels.gsa.*``, the Triton
modules included), with their imports of each other rewritten as sibling imports.

What transformers' loader (``transformers/dynamic_module_utils.py``) demands of those files:

- ``get_relative_imports`` finds ``from .name import`` with a regex over the whole text
  (function bodies, and docstrings too), and every name it finds must be a file in the folder.
- ``check_imports`` refuses a file whose absolute imports are not installed, unless they sit in
  a ``try`` block. Triton must stay optional (CPU loading without it), so each ``import triton``
  is wrapped in a ``try`` that re-raises with the remedy; only the GPU path imports those modules.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOTS = ("t2r.models.configuration_t2r", "t2r.models.modeling_t2r")
AUTO_MAP = {"AutoConfig": "configuration_t2r.T2RConfig", "AutoModelForCausalLM": "modeling_t2r.T2RForCausalLM"}
REQUIRED = {"torch", "transformers"}  # what a user of the export needs besides the standard library
OPTIONAL = {"triton"}  # imported only by the GPU kernels; wrapped in try blocks
PACKAGE = "t2r"


class RemoteCodeError(RuntimeError):
    """The t2r sources cannot be flattened into loadable remote code (a t2r bug, not a user error)."""


@dataclass
class _Edit:
    start: tuple[int, int]  # (line, col), 1-based line as in ast
    end: tuple[int, int]
    text: str


@dataclass
class FlatModule:
    name: str  # dotted module name in the t2r package
    origin: Path
    is_package: bool
    imports: dict[int, str] = field(default_factory=dict)  # id(ast node) -> t2r module it imports
    tree: ast.Module | None = None
    flat: str = ""  # file stem in the export


def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ModuleNotFoundError, ValueError):
        return None


def _is_submodule(package: str, name: str) -> bool:
    spec = _spec(package)
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(d) / f"{name}.py").is_file() or (Path(d) / name / "__init__.py").is_file()
               for d in spec.submodule_search_locations)


def _walk(tree: ast.AST):
    """(node, inside_try, top_level) for every import statement in the tree."""
    def visit(node, in_try, depth):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_try, depth == 0
            try_block = isinstance(child, ast.Try) or (sys.version_info >= (3, 11) and isinstance(child, ast.TryStar))
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            yield from visit(child, in_try or try_block, depth + (1 if nested else 0))
    yield from visit(tree, False, 0)


def _target(module: FlatModule, node: ast.AST) -> str | None:
    """The t2r module an import statement imports from (None: not a t2r import)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                raise RemoteCodeError(
                    f"{module.origin}: 'import {alias.name}' cannot be flattened; write 'from {alias.name} import NAME'")
        return None
    if node.level:
        package = module.name if module.is_package else module.name.rpartition(".")[0]
        base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
    elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
        base = node.module
    else:
        return None
    for alias in node.names:
        if node.module is None or _is_submodule(base, alias.name):
            raise RemoteCodeError(
                f"{module.origin}:{node.lineno}: importing the module {base}.{alias.name} by name cannot be "
                f"flattened; import what you need from it: 'from {base}.{alias.name} import NAME'")
    return base


def collect(roots=ROOTS) -> dict[str, FlatModule | None]:
    """The import closure of ``roots`` inside the t2r package: module name -> FlatModule, or None
    for a module imported lazily (inside a function) that does not exist."""
    found: dict[str, FlatModule | None] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        spec = _spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            found[name] = None
            continue
        module = FlatModule(name, Path(spec.origin), spec.submodule_search_locations is not None)
        module.tree = ast.parse(module.origin.read_text(encoding="utf-8"), str(module.origin))
        for node, _, top_level in _walk(module.tree):
            target = _target(module, node)
            if target is None:
                continue
            module.imports[id(node)] = target
            if target not in found:
                todo.append(target)
                if _spec(target) is None and top_level:
                    raise RemoteCodeError(f"{module.origin}:{node.lineno}: imports {target}, which does not exist")
        found[name] = module
    return found


def _assign_flat_names(modules: list[FlatModule]) -> None:
    """The last component of the name (a package's own name), or the dotted path under t2r joined
    by '_' where two modules would share a file name (t2r.layers.gsa, t2r.kernels.gsa)."""
    short = {m.name: m.name.rpartition(".")[2] for m in modules}
    counts: dict[str, int] = {}
    for s in short.values():
        counts[s] = counts.get(s, 0) + 1
    for m in modules:
        s = short[m.name]
        m.flat = s if counts[s] == 1 else m.name.removeprefix(PACKAGE + ".").replace(".", "_")
    for root, stem in zip(ROOTS, ("configuration_t2r", "modeling_t2r")):
        flat = next(m.flat for m in modules if m.name == root)
        if flat != stem:
            raise RemoteCodeError(f"{root} would be written as {flat}.py, but auto_map needs {stem}.py")


def _import_text(node: ast.ImportFrom, flat: str) -> str:
    names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
    return f"from .{flat} import {names}"


def _triton_guard(nodes: list[ast.AST], source: str) -> str:
    statements = "\n".join(f"    {ast.get_source_segment(source, n) or ast.unparse(n)}" for n in nodes)
    return (
        "try:  # triton is optional: only the GPU kernels import it\n"
        f"{statements}\n"
        "except ImportError as _triton_error:\n"
        "    raise ImportError(\"the GSA Triton kernels need the triton package: pip install triton \"\n"
        "                      \"(without it the model runs the torch implementation)\") from _triton_error"
    )


def _absolute_top(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    return [node.module.split(".")[0]] if node.level == 0 and node.module else []


def _on_own_lines(node: ast.AST, lines: list[str]) -> bool:
    """Nothing but indentation before the statement and at most a comment after it (it is rewritten)."""
    after = lines[node.end_lineno - 1][node.end_col_offset:].strip()
    return not lines[node.lineno - 1][:node.col_offset].strip() and (not after or after.startswith("#"))


def _edits(module: FlatModule, closure: dict[str, FlatModule | None], lines: list[str]) -> list[_Edit]:
    edits, guarded = [], []
    for node, in_try, _ in _walk(module.tree):
        span = ((node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset))
        target = module.imports.get(id(node))
        if (target is not None or set(_absolute_top(node)) & OPTIONAL) and not _on_own_lines(node, lines):
            raise RemoteCodeError(f"{module.origin}:{node.lineno}: put this import on a line of its own")
        if target is not None:
            dep = closure[target]
            if dep is None:  # a lazily imported module that does not exist: fail there, as t2r does
                text = (f"raise ModuleNotFoundError(\"{target} was not part of t2r when this model was "
                        "exported\")")
            else:
                text = _import_text(node, dep.flat)
            edits.append(_Edit(*span, text))
            continue
        tops = set(_absolute_top(node))
        if in_try or not tops:
            continue
        if tops & OPTIONAL:  # consecutive optional imports share one try block
            if guarded and guarded[-1][-1].end_lineno + 1 == node.lineno and guarded[-1][-1].col_offset == node.col_offset:
                guarded[-1].append(node)
            else:
                guarded.append([node])
        elif tops - REQUIRED - set(sys.stdlib_module_names) - {"__future__"}:
            raise RemoteCodeError(
                f"{module.origin}:{node.lineno}: imports {', '.join(sorted(tops))}, which the exported model "
                f"cannot require (only {', '.join(sorted(REQUIRED))}, the standard library and optional triton)")
    source = "".join(lines)
    for group in guarded:
        start, end = (group[0].lineno, group[0].col_offset), (group[-1].end_lineno, group[-1].end_col_offset)
        edits.append(_Edit(start, end, _triton_guard(group, source)))
    return edits


def _apply(lines: list[str], edits: list[_Edit]) -> str:
    for e in sorted(edits, key=lambda e: e.start, reverse=True):
        (l0, c0), (l1, c1) = e.start, e.end
        indent = " " * c0
        text = e.text.replace("\n", "\n" + indent)
        head, tail = lines[l0 - 1][:c0], lines[l1 - 1][c1:]
        lines[l0 - 1:l1] = [head + text + tail]
    return "".join(lines)


def flat_sources() -> tuple[dict[str, str], list[str]]:
    """({file name: text} of the flat modeling files, notes on lazily imported modules that are missing)."""
    from t2r import __version__

    closure = collect()
    modules = sorted((m for m in closure.values() if m is not None), key=lambda m: m.name)
    _assign_flat_names(modules)
    files = {}
    for m in modules:
        lines = m.origin.read_text(encoding="utf-8").splitlines(keepends=True)
        body = _apply(lines, _edits(m, closure, lines))
        header = (f"# Generated by `t2r export` (t2r {__version__}) from the module {m.name}.\n"
                  "# Edit the t2r sources, not this file: every export writes it again.\n")
        files[f"{m.flat}.py"] = header + body
    missing = sorted(name for name, m in closure.items() if m is None)
    notes = [f"{name} does not exist in this t2r; the exported code raises ModuleNotFoundError where it is "
             "imported (as t2r does)" for name in missing]
    return files, notes


def check_loadable(folder: Path, names: list[str]) -> None:
    """Run transformers' own remote-code checks over the written files: every relative import is a
    file in the folder, and every absolute import outside a try block is torch, transformers or stdlib."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    allowed = REQUIRED | set(sys.stdlib_module_names) | {"__future__"}
    for name in names:
        path = folder / name
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
        for rel in get_relative_imports(path):
            if not (folder / f"{rel}.py").is_file():
                raise RemoteCodeError(f"{name} imports .{rel}, which is not in the export")
        extra = set(get_imports(path)) - allowed
        if extra:
            raise RemoteCodeError(f"{name} needs {', '.join(sorted(extra))} outside a try block")


def write_remote_code(folder: Path) -> tuple[list[str], list[str]]:
    """Write the flat modeling files into ``folder``; return (file names, notes)."""
    files, notes = flat_sources()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    check_loadable(folder, sorted(files))
    return sorted(files), notes


def make_loadable_by_path(folder: Path) -> list[str]:
    """Give a saved model folder (``t2r convert``'s output, a run's ``model/`` and ``base/``) the flat
    modeling files and ``config.json``'s ``auto_map``, as exports have, so tools that load models by
    path without importing t2r open it with ``trust_remote_code=True``. Returns the files written."""
    import json

    names, _ = write_remote_code(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = dict(AUTO_MAP)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return names
