"""Rules the source keeps: short functions, short modules, imports down the layers and never in a circle."""
import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "captioning"
MAX_LINES = 60


def long_functions(path: Path, max_lines: int = MAX_LINES) -> list[str]:
    """'file:line name (n lines)' for every function or method (nested ones too) over `max_lines` lines."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > max_lines]


def test_the_source_is_there():
    assert len(list(SOURCE.rglob("*.py"))) >= 10, SOURCE


def test_the_checker_finds_a_long_method(tmp_path):
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_LINES))       # with its def line: 61 lines
    (tmp_path / "long.py").write_text(f"class A:\n    def f(self):\n{body}\n\ndef short():\n    return 1\n")
    assert long_functions(tmp_path / "long.py") == [f"long.py:2 f ({MAX_LINES + 1} lines)"]
    assert long_functions(tmp_path / "long.py", MAX_LINES + 1) == []


def test_no_function_is_longer_than_60_lines():
    offenders = [line for path in sorted(SOURCE.rglob("*.py")) for line in long_functions(path)]
    assert not offenders, f"functions longer than {MAX_LINES} lines: " + "; ".join(offenders)


# -----------------------------------------------------------------------------
# the layers: imports go down only, and no module imports itself back

# lowest first; a module's layer is its subpackage (or top-level module) under captioning/. The foundation
# (config, files, device, env) may be imported by all; `captioning` itself (__init__, __main__) sits on top.
LAYERS = (("config", "config_checks", "files", "device", "env"), ("data",), ("model",), ("decode",),
          ("captioner",), ("eval",), ("train",), ("serve",), ("cli",), ("__init__", "__main__"))
MAX_MODULE_LINES = 400


def module_names(root: Path) -> dict[str, Path]:
    """'captioning.data.corpus' -> its file, for every module under `root` (a package named by its folder)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `name` imports anywhere in its file (module level, in functions, under
    TYPE_CHECKING): `from pkg import mod` counts as mod, `from mod import x` as mod."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def layer_of(name: str) -> int:
    parts = name.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return next(i for i, names in enumerate(LAYERS) if key in names)


def layering_problems(root: Path) -> list[str]:
    """Every upward import ('a -> b: layer x imports layer y') and every import cycle ('cycle: a -> b -> a')."""
    modules = module_names(root)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    problems = [f"{a} -> {b}: {LAYERS[layer_of(a)][0]} may not import {LAYERS[layer_of(b)][0]}"
                for a, targets in sorted(graph.items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]
    state, stack = {}, []

    def visit(node: str) -> None:          # depth-first; a grey node met again closes a cycle
        state[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "grey":
                problems.append("cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "black"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return problems


def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path):
    root = tmp_path / "captioning"
    for folder in ("data", "model"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text('"""A layer."""\n')
    (root / "__init__.py").write_text("")
    (root / "data" / "a.py").write_text("def f():\n    from ..model import b\n")        # data reaches up to model
    (root / "model" / "b.py").write_text("from . import c\n")
    (root / "model" / "c.py").write_text("from .b import x\nfrom ..data.a import f\n")  # b <-> c
    assert layering_problems(root) == ["captioning.data.a -> captioning.model.b: data may not import model",
                                       "cycle: captioning.data.a -> captioning.model.b -> captioning.model.c -> "
                                       "captioning.data.a",
                                       "cycle: captioning.model.b -> captioning.model.c -> captioning.model.b"]


def test_imports_go_down_the_layers_and_never_in_a_circle():
    problems = layering_problems(SOURCE)
    assert not problems, "\n".join(problems)


def test_every_module_belongs_to_a_layer_and_every_subpackage_says_what_it_owns():
    for name, path in module_names(SOURCE).items():
        layer_of(name)                                              # StopIteration: a module of no layer
        if path.name == "__init__.py" and path.parent != SOURCE:
            assert ast.get_docstring(ast.parse(path.read_text())), f"{path}: say what the subpackage owns"


def test_no_module_is_longer_than_400_lines():
    long = [f"{p.relative_to(SOURCE)} ({n})" for p in SOURCE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {', '.join(long)}"
