"""The `ldm` package's import graph: circles, function-level imports and their stated reasons, upward imports.

`python bench/import_graph.py` reads every module under ldm/ with `ast` (nothing is imported), builds the graph
of `ldm.*` imports between modules and prints:
- the circles (strongly connected components) through module-level imports, and through all imports
  (function-level ones included), with the edges that close each circle;
- every function-level `from ldm...` / `import ldm...` with file:line and the comment on that line or the
  line above (the rule: one stays only for a stated reason, an optional heavy dependency or a command's
  start-up time);
- the imports that go up the layers (LAYERS below; a module that only re-exports takes its targets' layer).

`--trace sample` runs sample.py's model loading on a tiny random export it writes to a temporary folder
(`run_sampling`, up to the first image) under `sys.setprofile` and prints each call that crosses from one ldm
module into another, in order, with the layer it goes to: the files loading passes through, and how often it
climbs back up a layer. `--json PATH` writes the numbers.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The layers of DESIGN.md "Package layout", lowest first; the longest matching prefix wins.
LAYERS: list[tuple[str, int, str]] = [
    ("ldm.errors", 0, "base"),
    ("ldm.nn", 0, "nn"),
    ("ldm.data", 0, "data"),
    ("ldm.autoencoder", 1, "models"),
    ("ldm.diffusion", 1, "models"),
    ("ldm.conditioning", 1, "models"),
    ("ldm.checkpoints", 2, "formats"),
    ("ldm.weights", 2, "formats"),
    ("ldm.metrics", 2, "metrics"),
    ("ldm.autoencoder.module", 3, "training"),
    ("ldm.diffusion.module", 3, "training"),
    ("ldm.train", 3, "training"),
    ("ldm.train.cli", 4, "top"),
    ("ldm.bundle", 4, "top"),
    ("ldm.sampling", 4, "top"),
    ("ldm.export", 4, "top"),
    ("ldm.evaluate", 4, "top"),
    ("ldm.prefetch", 4, "top"),
    ("ldm.ema_reconstruct", 4, "top"),
    ("ldm.reference_images", 4, "top"),
    ("ldm.sweep_table", 4, "top"),
]


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    function_level: bool
    statement: str
    comment: str


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _comment(lines: list[str], lineno: int) -> str:
    """The comment on the import's line, else the comment-only line right above it or above its group of
    imports (one reason stated for consecutive imports)."""
    line = lines[lineno - 1]
    if "#" in line:
        return line.split("#", 1)[1].strip()
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith(("from ", "import ")) and "#" not in lines[i]:
        i -= 1
    above = lines[i].strip() if i >= 0 else ""
    return above[1:].strip() if above.startswith("#") else ""


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[ast.stmt, bool]]:
    """(import node, inside a function) for every import that runs: TYPE_CHECKING blocks are skipped."""
    found: list[tuple[ast.stmt, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    visit(ast.Module(body=[orelse], type_ignores=[]), in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _targets(node: ast.stmt, source: str, is_package: bool, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [_known(n, modules) for n in names if n == "ldm" or n.startswith("ldm.")]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:  # relative: from the module's package
        package = source.split(".") if is_package else source.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join([*package, *([base] if base else [])])
    if not (base == "ldm" or base.startswith("ldm.")):
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in modules else _known(base, modules))
    return out


def _known(name: str, modules: set[str]) -> str:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _is_shim(tree: ast.Module) -> bool:
    """A module that only re-exports: docstring, imports, constant assignments (`__all__`, a list of names)
    and a module `__getattr__` that looks the moved names up where they went."""
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return bool(body) and all(
        isinstance(n, (ast.Import, ast.ImportFrom))
        or (isinstance(n, ast.Assign) and isinstance(n.value, (ast.Tuple, ast.List, ast.Constant)))
        or (isinstance(n, ast.FunctionDef) and n.name == "__getattr__") for n in body)


HAND_OFF = "(layering)"  # the comment that marks a model class's one-line hand-off to the format layer


def build_graph(root: Path) -> tuple[list[Edge], set[str], set[str]]:
    package = root / "ldm"
    files = sorted(package.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    edges, shims, seen = [], set(), set()
    for path in files:
        source = module_name(path, root)
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text, str(path))
        if _is_shim(tree):
            shims.add(source)
        for node, in_function in _imports(tree):
            for target in _targets(node, source, path.name == "__init__.py", modules):
                if target != source and (source, node.lineno, target) not in seen:
                    seen.add((source, node.lineno, target))
                    edges.append(Edge(source, target, node.lineno, in_function, lines[node.lineno - 1].strip(),
                                      _comment(lines, node.lineno)))
    return edges, modules, shims


def strongly_connected(nodes: set[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's components with more than one module: the circles."""
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(nodes):
        if v not in index:
            connect(v)
    return sorted(out)


def layer_of(module: str, layers: dict[str, tuple[int, str]] | None = None) -> tuple[int, str]:
    if layers and module in layers:
        return layers[module]
    best = ("", -1, "unplaced")
    for prefix, rank, name in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best[0]):
            best = (prefix, rank, name)
    return best[1], best[2]


def module_layers(modules: set[str], edges: list[Edge], shims: set[str]) -> dict[str, tuple[int, str]]:
    layers = {m: layer_of(m) for m in modules}
    for shim in shims:  # a re-export sits where what it re-exports sits
        targets = [layers[e.target] for e in edges if e.source == shim]
        if targets:
            rank, name = max(targets)
            layers[shim] = (rank, f"{name} (re-export)")
    return layers


def _relpath(module: str, root: Path) -> str:
    path = Path(*module.split("."))
    return str(path / "__init__.py") if (root / path).is_dir() else f"{path}.py"


def report(root: Path) -> dict[str, Any]:
    edges, modules, shims = build_graph(root)
    top = [e for e in edges if not e.function_level]
    nested = list({(e.source, e.line): e for e in edges if e.function_level}.values())  # one per statement
    layers = module_layers(modules, edges, shims)
    print(f"# ldm import graph ({root})\n")
    print(f"{len(modules)} modules, {len({(e.source, e.target) for e in top})} module-level edges, "
          f"{len(nested)} function-level ldm imports\n")
    circles_top = strongly_connected(modules, top)
    circles_all = strongly_connected(modules, edges)
    print(f"## Circles through module-level imports: {len(circles_top)}")
    for c in circles_top:
        print("- " + " <-> ".join(c))
    print(f"\n## Circles through all imports (function-level included): {len(circles_all)}")
    for c in circles_all:
        print("- " + " <-> ".join(c))
        for e in edges:
            if e.source in c and e.target in c:
                kind = "function" if e.function_level else "module"
                why = f"  # {e.comment}" if e.comment else ""
                print(f"    {_relpath(e.source, root)}:{e.line} -> {e.target} ({kind}){why}")
    without_hand_offs = [e for e in edges if not (e.function_level and HAND_OFF in e.comment)]
    circles_left = strongly_connected(modules, without_hand_offs)
    print(f"\n## Circles left when the model classes' one-line from_pretrained/save_pretrained hand-offs "
          f"(comment {HAND_OFF!r}) are set aside: {len(circles_left)}")
    for c in circles_left:
        print("- " + " <-> ".join(c))
    print(f"\n## Function-level ldm imports: {len(nested)} "
          f"({sum(1 for e in nested if not e.comment)} without a comment)")
    for e in sorted(nested, key=lambda e: (e.source, e.line)):
        why = e.comment or "(no reason given)"
        print(f"- {_relpath(e.source, root)}:{e.line}  {e.statement}  -- {why}")
    upward = [e for e in edges if layers[e.target][0] > layers[e.source][0]]
    print(f"\n## Upward imports (a lower layer importing a higher one): {len(upward)}")
    print("layers: " + ", ".join(f"{rank} {name}" for rank, name in sorted({(r, n) for _, r, n in LAYERS})))
    for e in sorted(upward, key=lambda e: (e.source, e.line)):
        kind = "function" if e.function_level else "module"
        print(f"- {_relpath(e.source, root)}:{e.line} [{layers[e.source][1]}] -> {e.target} "
              f"[{layers[e.target][1]}] ({kind})")
    return {"modules": len(modules), "circles_module_level": circles_top, "circles_all": circles_all,
            "circles_without_hand_offs": circles_left,
            "function_level_imports": len(nested),
            "function_level_without_comment": sum(1 for e in nested if not e.comment),
            "upward_imports": len(upward)}


# ---------------------------------------------------------------- --trace sample


def _tiny_export(folder: Path) -> Path:
    """A random-weight stage=ldm export, as `python -m ldm.export` writes it."""
    import torch

    from ldm.checkpoints.bundle import write_bundle
    from ldm.diffusion.module import LatentDiffusionModule

    torch.manual_seed(0)
    module = LatentDiffusionModule(
        unet=dict(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                  num_head_channels=16),
        text_encoder=dict(model_name=None, width=32, heads=2, layers=1, context_length=16),
        autoencoder=dict(embed_dim=4, z_channels=4, ch=16, ch_mult=[1, 2], num_res_blocks=1, resolution=16,
                         attn_resolutions=[], norm_num_groups=16),
        scale_factor=0.5, num_inference_steps=1)
    return write_bundle(module.eval(), folder / "export", outside_layouts=False)


class _Stop(Exception):
    """Raised by the profiler once the model is loaded: the trace needs loading only, not sampling."""


def trace_sample(root: Path, calls: bool = False) -> dict[str, Any]:
    """Every call from one ldm module into another while sample.py's run_sampling loads a model."""
    from hydra import compose, initialize_config_dir

    from ldm import sampling

    package = str(root / "ldm")
    edges, modules, shims = build_graph(root)
    layers_by_module = module_layers(modules, edges, shims)

    def module_of(code: Any) -> str | None:
        filename = code.co_filename
        if not filename.startswith(package):
            return None
        return module_name(Path(filename), root)

    crossings: list[tuple[str, str, str, str]] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        callee = module_of(frame.f_code)
        if callee is None or frame.f_code.co_name.startswith("<"):
            return
        if frame.f_back is not None and frame.f_back.f_code.co_name == "<module>":
            return  # a class body running at import time, not a call
        if frame.f_code.co_name == "generate":
            raise _Stop  # the model is loaded; sampling starts
        caller_frame = frame.f_back
        while caller_frame is not None and (module_of(caller_frame.f_code) is None
                                            or caller_frame.f_code.co_name.startswith("<")):
            caller_frame = caller_frame.f_back
        caller = module_of(caller_frame.f_code) if caller_frame is not None else None
        if caller is not None and caller != callee:
            crossings.append((caller, caller_frame.f_code.co_qualname, callee, frame.f_code.co_qualname))

    with tempfile.TemporaryDirectory() as tmp:
        export = _tiny_export(Path(tmp))
        with initialize_config_dir(version_base="1.3", config_dir=str(root / "conf")):
            cfg = compose(config_name="sample", overrides=[f"ckpt={export}", f"out={tmp}/samples", "prompt=a",
                                                           "device=cpu", "progress=false", "score_shapes=false"])
        sys.setprofile(profile)
        try:
            sampling.run_sampling(cfg)
        except _Stop:
            pass  # the model is loaded; sampling itself is not traced
        finally:
            sys.setprofile(None)

    seen: dict[tuple[str, str, str, str], int] = {}
    for c in crossings:
        seen[c] = seen.get(c, 0) + 1
    def up(caller: str, callee: str) -> bool:
        return layers_by_module[callee][0] > layers_by_module[caller][0]

    hops: dict[tuple[str, str], list[str]] = {}
    for caller, _, callee, callee_fn in seen:
        names = hops.setdefault((caller, callee), [])
        if callee_fn not in names:
            names.append(callee_fn)
    print("\n## sample.py ckpt=<export>: module -> module hops of model loading, in order of first call")
    for (caller, callee), names in hops.items():
        mark = "  UP" if up(caller, callee) else ""
        shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
        print(f"- {caller} [{layers_by_module[caller][1]}] -> {callee} [{layers_by_module[callee][1]}]: "
              f"{shown}{mark}")
    climbs = sum(up(caller, callee) for caller, _, callee, _ in seen)
    if calls:
        print("\n## every distinct call that crosses modules (repeats counted)")
        for (caller, caller_fn, callee, callee_fn), count in seen.items():
            mark = "  UP" if up(caller, callee) else ""
            times = f" x{count}" if count > 1 else ""
            print(f"- {caller}.{caller_fn} -> {callee}.{callee_fn}{times}{mark}")
    files = sorted({c[0] for c in seen} | {c[2] for c in seen})
    pairs = defaultdict(int)
    for caller, _, callee, _ in seen:
        pairs[tuple(sorted((caller, callee)))] += 1
    back_and_forth = {f"{a} <-> {b}": n for (a, b) in pairs
                      if any(c[0] == a and c[2] == b for c in seen) and any(c[0] == b and c[2] == a for c in seen)
                      for n in [pairs[(a, b)]]}
    print(f"\n{len(seen)} distinct cross-module calls, {len(hops)} module hops, through {len(files)} files; "
          f"{climbs} calls climb to a higher layer ({sum(up(a, b) for a, b in hops)} hops)")
    print("files: " + ", ".join(_relpath(f, root) for f in files))
    if back_and_forth:
        print("calls both ways between: " + "; ".join(back_and_forth))
    return {"calls": len(seen), "hops": len(hops), "files": [_relpath(f, root) for f in files], "climbs": climbs,
            "upward_hops": [f"{a} -> {b}" for a, b in hops if up(a, b)],
            "both_ways": back_and_forth}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to read (default: this one)")
    parser.add_argument("--trace", choices=["sample"], help="also trace a command's model loading")
    parser.add_argument("--calls", action="store_true", help="with --trace: list every cross-module call too")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    result = report(root)
    if args.trace == "sample":
        sys.path.insert(0, str(root))
        result["trace_sample"] = trace_sample(root, args.calls)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
