"""How far a command's ``cfg`` travels: the stops of its walk, counted from the source (ast, nothing runs).

    python scripts/cfg_walk.py [predict|eval|all] [--list] [--values]

From the Hydra app's function (``lorkd.cli._predict`` / ``_evaluate``) the walk follows ``cfg`` and every
part of it: an attribute, item or ``.get`` of a part, a part converted (``plain``, ``dict``, ``str``,
``Path``, ...), a container or ``**`` holding a part, what a project function returns when it returns a
part it was given (``arguments(cfg)``), and a local name assigned one. Each project function that a call
hands a part to (as an argument, or to the parameters ``**part`` may fill) is a **stop**; the walk goes
on inside it with the parameters that received a config node (a mapping or list of the config; with
``--values`` also with those that received only a value: a path, a number, a name). An object a class
builds is new (not a part; its ``__init__`` is a stop), and so is anything else a function makes; an
attribute stored on ``self`` is not followed. Calls are resolved through the module's imports (also those
inside functions), ``self``/``cls``/``super()`` and classes (their ``__init__``); a method of an object
whose class the source does not name is not followed.

A **climb** is a call back up: to a stop in a higher layer than its caller's (layers, top down: commands;
``lorkd.api``; inference, evaluation, modules; checkpoints; data, experts, prompts, regions, labels;
models, io, utils), or back into a package that the chain of callers had left (``inference -> api ->
inference``). Each call edge is counted once.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = {"predict": ("lorkd.cli._predict", "predict"), "eval": ("lorkd.cli._evaluate", "eval")}
# calls whose result is still the value they were given (a part stays a part)
CONVERSIONS = {"plain", "dict", "list", "tuple", "str", "int", "float", "bool", "Path", "sorted", "to_container"}
# layer of a module, by the longest matching prefix (higher: closer to the commands)
LAYERS = {
    "lorkd.cli": 6, "lorkd.commands": 6, "lorkd.training": 6,
    "lorkd.api": 5,
    "lorkd.inference": 4, "lorkd.evaluation": 4, "lorkd.modules": 4,
    "lorkd.checkpoints": 3,
    "lorkd.data": 2, "lorkd.experts": 2, "lorkd.prompts": 2, "lorkd.regions": 2, "lorkd.label_catalogue": 2,
    "lorkd": 1,
}  # fmt: skip


def package(module: str) -> str:
    """``lorkd.checkpoints.loading`` -> ``lorkd.checkpoints``; a top-level module is its own package, and
    the command modules are one package, ``commands``."""
    if layer(module) == max(LAYERS.values()):
        return "commands"
    parts = module.split(".")
    return ".".join(parts[:2])


def layer(module: str) -> int:
    return max((n for prefix, n in LAYERS.items() if module == prefix or module.startswith(prefix + ".")), default=1)


@cache
def parse(module: str) -> ast.Module | None:
    base = ROOT / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return ast.parse(path.read_text(encoding="utf-8"))
    return None


def is_module(name: str) -> bool:
    return name.startswith("lorkd") and parse(name) is not None


def _imports(nodes: list[ast.stmt] | ast.AST, module: str) -> dict[str, str]:
    """Local name -> dotted target (``lorkd.x.y`` module or ``lorkd.x.name``) of the import statements in ``nodes``."""
    names: dict[str, str] = {}
    package = module if (ROOT / module.replace(".", "/")).is_dir() else module.rpartition(".")[0]
    for node in ast.walk(nodes) if isinstance(nodes, ast.AST) else (n for s in nodes for n in ast.walk(s)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                names[alias.asname or alias.name] = f"{base}.{alias.name}"
    return names


@dataclass(frozen=True)
class Def:
    module: str
    qualname: str  # "f" or "Class.method" or "Class"
    node: ast.AST = field(compare=False, hash=False)
    cls: str | None = field(default=None, compare=False, hash=False)

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}"


def top_level(module: str, name: str) -> Def | None:
    """The function or class ``name`` of ``module`` (following a re-export through its imports)."""
    tree = parse(module)
    if tree is None:
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return Def(module, name, node, name if isinstance(node, ast.ClassDef) else None)
    target = _imports(tree.body, module).get(name)
    return resolve_dotted(target) if target and target != f"{module}.{name}" else None


def resolve_dotted(target: str) -> Def | None:
    if is_module(target):
        return None
    module, _, name = target.rpartition(".")
    return top_level(module, name) if is_module(module) else None


def method(cls: Def, name: str) -> Def | None:
    """``cls.name``, looked up in ``cls`` and its project base classes."""
    assert isinstance(cls.node, ast.ClassDef)
    for node in cls.node.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return Def(cls.module, f"{cls.qualname}.{name}", node, cls.qualname)
    for base in cls.node.bases:
        found = resolve_name(base, cls.module, {}) if isinstance(base, (ast.Name, ast.Attribute)) else None
        if isinstance(found, Def) and isinstance(found.node, ast.ClassDef):
            inherited = method(found, name)
            if inherited is not None:
                return inherited
    return None


def resolve_name(expr: ast.expr, module: str, local: dict[str, str]) -> Def | str | None:
    """What a ``Name`` or ``a.b`` expression names: a project function/class, a module (its dotted name), or None."""
    if isinstance(expr, ast.Name):
        target = local.get(expr.id) or _imports(parse(module).body, module).get(expr.id)
        if target is None:
            return top_level(module, expr.id)
        return target if is_module(target) else resolve_dotted(target)
    if isinstance(expr, ast.Attribute):
        owner = resolve_name(expr.value, module, local)
        if isinstance(owner, str):
            sub = f"{owner}.{expr.attr}"
            return sub if is_module(sub) else top_level(owner, expr.attr)
        if isinstance(owner, Def) and isinstance(owner.node, ast.ClassDef):
            return method(owner, expr.attr)
    return None


def callee(call: ast.Call, fn: Def, local: dict[str, str]) -> tuple[Def | None, bool]:
    """The project function a call runs and whether its first parameter is bound (a method)."""
    func = call.func
    enclosing = top_level(fn.module, fn.cls) if fn.cls else None
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in ("self", "cls") and enclosing:
        return method(enclosing, func.attr), True
    if isinstance(func, ast.Name) and func.id == "cls" and enclosing:
        return (method(enclosing, "__init__") or enclosing), True
    if (
        isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call) and isinstance(func.value.func, ast.Name)
        and func.value.func.id == "super" and enclosing
    ):  # fmt: skip
        for base in enclosing.node.bases:
            found = resolve_name(base, fn.module, local)
            if isinstance(found, Def) and isinstance(found.node, ast.ClassDef):
                return method(found, func.attr) or (found if func.attr == "__init__" else None), True
        return None, True
    found = resolve_name(func, fn.module, local)
    if isinstance(found, Def) and isinstance(found.node, ast.ClassDef):
        return (method(found, "__init__") or found), True
    bound = isinstance(found, Def) and found.cls is not None and isinstance(func, ast.Attribute)
    if bound and isinstance(found.node, ast.FunctionDef):  # Class.classmethod(...) binds cls; Class.f(obj) does not
        bound = any(isinstance(d, ast.Name) and d.id in ("classmethod", "staticmethod") for d in found.node.decorator_list)
        bound = bound and not any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in found.node.decorator_list)
    return (found if isinstance(found, Def) else None), bound


NOT = "not a part"  # what ``shape`` returns for an expression that holds no part of ``cfg``
Shape = Any  # None: a value (str, number, ...); a dict: a config node (its children's shapes, as far as known)


def config_shape(name: str) -> dict[str, Shape]:
    """The shape of ``configs/<name>.yaml``: its nodes and values; each group of its defaults list is a node."""
    raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text(encoding="utf-8"))

    def shape(value: Any) -> Shape:
        return {str(k): shape(v) for k, v in value.items()} if isinstance(value, dict) else {} if isinstance(value, list) else None

    groups = [next(iter(d)) for d in raw.pop("defaults", []) if isinstance(d, dict)]
    return {**{g.split(" ")[-1]: {} for g in groups}, **shape(raw)}


def _child(parent: Shape, key: str | None) -> Shape:
    return parent.get(key) if isinstance(parent, dict) and key is not None else None


def _merge(shapes: list[Shape]) -> Shape:
    out: dict[str, Shape] = {}
    for item in shapes:
        if isinstance(item, dict):
            out.update(item)
    return out


def shape(expr: ast.AST | None, parts: dict[str, Shape], fn: Def) -> Shape:
    """The shape of the part of ``cfg`` that ``expr`` (in ``fn``) is or holds, or :data:`NOT`."""
    if expr is None:
        return NOT
    if isinstance(expr, ast.Name):
        return parts.get(expr.id, NOT)
    if isinstance(expr, ast.Starred):
        return shape(expr.value, parts, fn)
    if isinstance(expr, (ast.Attribute, ast.Subscript)):
        owner = shape(expr.value, parts, fn)
        if owner is NOT:
            return NOT
        key = expr.attr if isinstance(expr, ast.Attribute) else (
            expr.slice.value if isinstance(expr.slice, ast.Constant) and isinstance(expr.slice.value, str) else None
        )
        return _child(owner, key)
    if isinstance(expr, ast.Call):
        func = expr.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        given = [shape(a, parts, fn) for a in [*expr.args, *(k.value for k in expr.keywords)]]
        if name in CONVERSIONS and not (isinstance(func, ast.Attribute) and shape(func.value, parts, fn) is not NOT):
            found = [g for g in given if g is not NOT]
            if not found:
                return NOT
            return found[0] if name in ("plain", "dict", "list", "tuple", "sorted", "to_container") else None
        if isinstance(func, ast.Attribute):
            owner = shape(func.value, parts, fn)
            if owner is not NOT:  # part.get("k"), part.items(), path.resolve()
                key = expr.args[0].value if func.attr == "get" and expr.args and isinstance(expr.args[0], ast.Constant) else None
                return _child(owner, key) if func.attr == "get" else {} if isinstance(owner, dict) else None
        target, bound = callee(expr, fn, local_imports(fn))
        if target is None or isinstance(target.node, ast.ClassDef) or target.qualname.endswith(".__init__"):
            return NOT
        received = receiving(expr, target, bound, parts, fn)
        return returned(target, received) if received else NOT
    if isinstance(expr, (ast.JoinedStr, ast.Compare, ast.Lambda)):
        return NOT
    if isinstance(expr, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
        return {} if any(shape(g.iter, parts, fn) is not NOT for g in expr.generators) else NOT
    if isinstance(expr, ast.Dict):
        held: dict[str, Shape] = {}
        found = False
        for key, value in zip(expr.keys, expr.values):
            inner = shape(value, parts, fn)
            if inner is NOT:
                continue
            found = True
            if key is None:
                held.update(inner if isinstance(inner, dict) else {})
            elif isinstance(key, ast.Constant):
                held[str(key.value)] = inner
        return held if found else NOT
    if isinstance(expr, (ast.List, ast.Tuple, ast.Set)):
        return {} if any(shape(e, parts, fn) is not NOT for e in expr.elts) else NOT
    inner = [shape(c, parts, fn) for c in ast.iter_child_nodes(expr) if isinstance(c, ast.expr)]
    inner = [i for i in inner if i is not NOT]
    if not inner:
        return NOT
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitOr):
        return _merge(inner)
    if isinstance(expr, (ast.BoolOp, ast.IfExp)):
        return inner[0]
    return None


_RETURNS: dict[tuple[str, str], Shape] = {}


def returned(fn: Def, params: dict[str, Shape]) -> Shape:
    """The shape of the part ``fn`` returns when its ``params`` hold these parts (:data:`NOT`: none)."""
    key = (fn.name, repr(sorted(params.items())))
    if key not in _RETURNS:
        _RETURNS[key] = NOT  # a recursive call returns no part
        parts = spread(fn, params)
        found = [shape(n.value, parts, fn) for n in ast.walk(fn.node) if isinstance(n, ast.Return)]
        _RETURNS[key] = next((f for f in found if f is not NOT), NOT)
    return _RETURNS[key]


def _targets(target: ast.AST) -> Iterator[str]:
    for node in ast.walk(target):
        if isinstance(node, ast.Name):
            yield node.id


def spread(fn: Def, parts: dict[str, Shape]) -> dict[str, Shape]:
    """``parts`` and every local name assigned a part in ``fn`` (nested functions and comprehensions included)."""
    parts = dict(parts)
    changed = True
    while changed:
        changed = False
        for node in ast.walk(fn.node):
            pairs: list[tuple[ast.AST, ast.AST | None]] = []
            if isinstance(node, ast.Assign):
                pairs = [(t, node.value) for t in node.targets]
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)):
                pairs = [(node.target, node.value)]
            elif isinstance(node, (ast.For, ast.comprehension)):
                pairs = [(node.target, node.iter)]
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                pairs = [(node.optional_vars, node.context_expr)]
            for target, value in pairs:
                if isinstance(target, (ast.Attribute, ast.Subscript)):
                    continue  # stored on an object: not followed
                found = shape(value, parts, fn)
                if found is NOT:
                    continue
                iterated = isinstance(node, (ast.For, ast.comprehension))
                whole = isinstance(target, ast.Name) and not iterated
                for name in _targets(target):
                    if name not in parts:
                        parts[name] = found if whole else None
                        changed = True
    return parts


def parameters(node: ast.AST) -> tuple[list[str], list[str], str | None, str | None]:
    args = node.args  # type: ignore[attr-defined]
    positional = [a.arg for a in [*args.posonlyargs, *args.args]]
    keyword_only = [a.arg for a in args.kwonlyargs]
    return positional, keyword_only, args.vararg.arg if args.vararg else None, args.kwarg.arg if args.kwarg else None


def receiving(call: ast.Call, target: Def, bound: bool, parts: dict[str, Shape], fn: Def) -> dict[str, Shape]:
    """The parameters of ``target`` that ``call`` hands a part to, with the part's shape."""
    if isinstance(target.node, ast.ClassDef):  # a class without __init__ (a dataclass): its fields
        received = {f"arg{i}": shape(a, parts, fn) for i, a in enumerate(call.args)}
        received |= {k.arg or "**": shape(k.value, parts, fn) for k in call.keywords}
        return {k: v for k, v in received.items() if v is not NOT}
    positional, keyword_only, vararg, kwarg = parameters(target.node)
    if bound and positional:
        positional = positional[1:]
    received: dict[str, Shape] = {}
    for i, arg in enumerate(call.args):
        found = shape(arg, parts, fn)
        if found is NOT:
            continue
        if isinstance(arg, ast.Starred) or i >= len(positional):
            received |= {p: None for p in positional[i:]} | ({vararg: {}} if vararg else {})
        else:
            received[positional[i]] = found
    given = {k.arg for k in call.keywords if k.arg}
    for k in call.keywords:
        found = shape(k.value, parts, fn)
        if found is NOT:
            continue
        if k.arg is None:  # **part: any parameter not given otherwise
            free = [p for p in positional[len(call.args):] + keyword_only if p not in given]
            for p in free:  # a node another ** gave stays a node
                if not isinstance(received.get(p), dict):
                    received[p] = _child(found, p)
            if kwarg:  # what no parameter takes: the children of the part not named by one
                rest = {c: v for c, v in found.items() if c not in positional and c not in keyword_only} if isinstance(found, dict) else {}
                received[kwarg] = {**(received.get(kwarg) or {}), **rest}
        elif k.arg in positional or k.arg in keyword_only:
            received[k.arg] = found
        elif kwarg:
            received[kwarg] = {**(received.get(kwarg) or {}), k.arg: found}
    return received


def local_imports(fn: Def) -> dict[str, str]:
    return _imports(fn.node, fn.module)


@dataclass
class Walk:
    stops: dict[str, set[str]] = field(default_factory=dict)  # stop -> parameters that received a part
    edges: list[tuple[str, str]] = field(default_factory=list)  # (caller, stop), first time each stop is reached
    climbs: list[tuple[str, str]] = field(default_factory=list)

    def files(self) -> set[str]:
        return {name.split(":")[0] for name in self.stops}


def walk(entry: str, config: str, values: bool = False) -> Walk:
    """The walk of ``config``'s ``cfg`` from the function ``entry``; ``values``: also on inside the functions
    that received only values (a path, a number), not only config nodes."""
    module, _, name = entry.rpartition(".")
    start = top_level(module, name)
    assert start is not None, entry
    result = Walk()
    seen: set[tuple[str, str]] = set()
    edges: set[tuple[str, str]] = set()
    # (function, parameters holding a part, packages of the callers' chain)
    first = parameters(start.node)[0][0]
    queue: list[tuple[Def, dict[str, Shape], tuple[str, ...]]] = [(start, {first: config_shape(config)}, ())]
    while queue:
        fn, params, chain = queue.pop(0)
        key = (fn.name, repr(sorted(params.items())))
        if key in seen or not params:
            continue
        seen.add(key)
        if isinstance(fn.node, ast.ClassDef):
            continue
        chain = chain if chain and chain[-1] == package(fn.module) else (*chain, package(fn.module))
        parts = spread(fn, params)
        local = local_imports(fn)
        for node in ast.walk(fn.node):
            if not isinstance(node, ast.Call):
                continue
            target, bound = callee(node, fn, local)
            if target is None or target.name == fn.name:
                continue
            received = receiving(node, target, bound, parts, fn)
            if not received:
                continue
            caller, stop = f"{fn.module}:{fn.qualname}", f"{target.module}:{target.qualname}"
            if stop not in result.stops:
                result.stops[stop] = set()
                result.edges.append((caller, stop))
            into = package(target.module)
            back = (into != chain[-1] and into in chain[:-1]) or layer(target.module) > layer(fn.module)
            if back and (caller, stop) not in edges:
                result.climbs.append((caller, stop))
            edges.add((caller, stop))
            result.stops[stop] |= set(received)
            nodes = {p: v for p, v in received.items() if values or isinstance(v, dict)}
            queue.append((target, nodes, chain))
    return result


def report(name: str, result: Walk, listing: bool) -> str:
    lines = [f"{name}: {len(result.stops)} stops in {len(result.files())} files, {len(result.climbs)} climbs"]
    if listing:
        lines += [f"  {caller} -> {stop}  ({', '.join(sorted(result.stops[stop]))})" for caller, stop in result.edges]
    lines += [f"  climb: {caller} -> {stop}" for caller, stop in result.climbs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="all", choices=[*ENTRIES, "all"])
    parser.add_argument("--list", action="store_true", help="every stop, with its caller and the parameters it received")
    parser.add_argument("--values", action="store_true", help="also walk on inside functions that received only values")
    args = parser.parse_args(argv)
    for name in ENTRIES if args.command == "all" else [args.command]:
        print(report(name, walk(*ENTRIES[name], values=args.values), args.list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
