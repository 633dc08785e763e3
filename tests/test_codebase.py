"""Rules the source keeps: short functions."""
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
    assert len(list(SOURCE.glob("*.py"))) >= 10, SOURCE


def test_the_checker_finds_a_long_method(tmp_path):
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_LINES))       # with its def line: 61 lines
    (tmp_path / "long.py").write_text(f"class A:\n    def f(self):\n{body}\n\ndef short():\n    return 1\n")
    assert long_functions(tmp_path / "long.py") == [f"long.py:2 f ({MAX_LINES + 1} lines)"]
    assert long_functions(tmp_path / "long.py", MAX_LINES + 1) == []


def test_no_function_is_longer_than_60_lines():
    offenders = [line for path in sorted(SOURCE.glob("*.py")) for line in long_functions(path)]
    assert not offenders, f"functions longer than {MAX_LINES} lines: " + "; ".join(offenders)
