"""The shape of the package: imports go one way (pure math never imports orchestration), no
import cycle (function-level imports included), no module over 450 lines, and only the process
modules (`difflax/processes/`) branch on which generative process a config trains."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "difflax")
# Pure math (DESIGN.md's layers): may import each other and leaf helpers, never what runs a loop.
PURE = ("schedules", "noise_scales", "diffusion", "losses", "samplers", "cascade", "growth",
        "evaluation.metrics", "trees", "images", "processes", "processes.base",
        "processes.discrete", "processes.continuous", "processes.ncsn", "processes.flow",
        "conditioning")
# What runs a loop, or touches devices, files or the network: never reachable from pure math.
ORCHESTRATION = ("experiment", "sampling", "pipeline", "evaluation.evaluator", "train", "modes",
                 "main", "data", "parallel", "fileio", "checkpoint", "writers", "folders", "sources",
                 "plan", "cli", "plots", "evaluation.features", "evaluation.inception")


def _imports(tree):
  """Every import node of a module at any depth, except inside its command-line entry point (a
  top-level `def main` or `if __name__ == "__main__":`, which only `python -m` runs)."""
  for node in tree.body:
    if isinstance(node, ast.FunctionDef) and node.name == "main":
      continue
    if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
      continue
    yield from (n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))


def import_graph(pkg_dir=PKG, entry_points=False):
  """{module: {imported difflax modules}} from every import statement (any depth in the file;
  entry points too when `entry_points`)."""
  mods = {}
  for d, _, files in os.walk(pkg_dir):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), os.path.dirname(pkg_dir))[:-3]
        mods[rel.replace(os.sep, ".").removesuffix(".__init__")] = os.path.join(d, f)
  graph = {m: set() for m in mods}
  for m, path in mods.items():
    tree = ast.parse(open(path).read())
    for node in (ast.walk(tree) if entry_points else _imports(tree)):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        base = (node.module if node.level == 0
                else ".".join(m.split(".")[:-node.level] + [node.module]))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
      graph[m] |= {n for n in names if n in mods and n != m and not m.startswith(n + ".")}
  return graph, mods


def find_cycle(graph):
  state, stack = {}, []

  def visit(v):
    state[v] = "open"
    stack.append(v)
    for w in sorted(graph[v]):
      if state.get(w) == "open":
        return stack[stack.index(w):] + [w]
      if w not in state and (found := visit(w)):
        return found
    state[v] = "done"
    stack.pop()
    return None
  for v in sorted(graph):
    if v not in state and (found := visit(v)):
      return found
  return None


def test_no_import_cycle():
  graph, _ = import_graph(entry_points=True)
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  from pkg import a\n")  # Function-level counts.
  graph, _ = import_graph(str(pkg))
  assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def reaches(graph, module, prefix="difflax."):
  """The forbidden (ORCHESTRATION) modules `module` imports, directly or through others."""
  def reach(m, seen):
    for n in graph[m]:
      if n not in seen:
        seen.add(n)
        reach(n, seen)
    return seen
  return sorted(n for n in reach(prefix + module, set())
                if n.removeprefix(prefix) in ORCHESTRATION)


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_orchestration(module):
  graph, _ = import_graph()
  bad = reaches(graph, module)
  assert not bad, f"difflax.{module} reaches {bad}"


def test_layering_check_finds_a_planted_violation(tmp_path):
  """A pure module reaching `data` through a helper is found; its CLI entry point is exempt."""
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "data.py").write_text("")
  (pkg / "helper.py").write_text("def f():\n  from pkg import data\n")
  (pkg / "schedules.py").write_text("from pkg import helper\n")
  (pkg / "losses.py").write_text("def main():\n  from pkg import data\n"
                                 "if __name__ == '__main__':\n  import pkg.data\n")
  graph, _ = import_graph(str(pkg))
  assert reaches(graph, "schedules", "pkg.") == ["pkg.data"]
  assert reaches(graph, "losses", "pkg.") == []


def test_no_module_over_450_lines():
  _, mods = import_graph()
  long = {m: n for m, p in mods.items() if (n := sum(1 for _ in open(p))) > 450}
  assert not long, long


PROCESS_NAMES = ("discrete", "continuous", "ncsn", "flow")


def process_name_comparisons(path: str) -> list:
  """Lines of `path` that compare against a process name or `<...>.diffusion.type` (==, !=, in),
  the branching `difflax.processes` owns."""
  def names_process(node):
    for n in ast.walk(node):
      if isinstance(n, ast.Constant) and n.value in PROCESS_NAMES:
        return True
      if (isinstance(n, ast.Attribute) and n.attr == "type" and isinstance(n.value, ast.Attribute)
          and n.value.attr == "diffusion"):
        return True
    return False
  with open(path) as f:
    tree = ast.parse(f.read())
  return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Compare) and names_process(n)]


def test_only_process_modules_compare_process_names():
  _, mods = import_graph()
  found = {m: lines for m, p in mods.items()
           if not m.startswith(("difflax.processes", "difflax.configs"))
           and (lines := process_name_comparisons(p))}
  assert not found, f"process names compared outside difflax/processes: {found}"


def test_process_name_check_finds_planted_comparisons(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("def f(c, kind):\n  if c.diffusion.type == kind:\n    return 1\n"
                  "  return kind in ('ncsn', 'x') or kind != 'y'\n")
  assert process_name_comparisons(str(path)) == [2, 4]
