"""The package's structure rules (docs/architecture.md), checked on the source: module-level imports form no
cycle, no library module imports the command line, the data layer does not import the model, every subcommand
is a module of ``fvlm.commands`` with the contract, the global mode is read in one place, and long modules say
why they are long."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fvlm"
MAX_LINES = 460  # "about 450"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ["fvlm", *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _top_level_imports(path: Path, known: set[str]) -> set[str]:
    """Our modules imported at module level (``if TYPE_CHECKING`` blocks and function bodies excluded)."""
    deps = set()
    for node in ast.parse(path.read_text()).body:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        deps.update(n for n in names if n in known)
    return deps


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _top_level_imports(p, set(mods)) - {m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_module_level_imports_form_no_cycle():
    assert _cycles(_graph()) == []


def test_no_library_module_imports_the_command_line():
    front = {"fvlm.cli", "fvlm.__main__"}
    offenders = {m: sorted(d) for m, d in _graph().items()
                 if m not in front and not m.startswith("fvlm.commands")
                 and any(x in front or x.startswith("fvlm.commands") for x in d)}
    assert offenders == {}
    # and not inside functions either
    for m, path in _modules().items():
        if m in front or m.startswith("fvlm.commands"):
            continue
        assert not re.search(r"^\s*(from fvlm(\.cli|\.commands)\b|import fvlm\.(cli|commands)\b)", path.read_text(),
                             re.M), m


def test_the_data_layer_does_not_import_the_model():
    for m, deps in _graph().items():
        if m.startswith("fvlm.data"):
            assert not [d for d in deps if d.startswith("fvlm.model")], m


def test_every_subcommand_is_a_command_module():
    from fvlm import cli

    names = [c.NAME for c in cli.COMMANDS]
    assert len(names) == len(set(names))
    for command in cli.COMMANDS:
        assert command.__name__ == "fvlm.commands." + command.NAME.replace("-", "_")
        assert callable(command.add_parser) and callable(command.run) and command.HELP
    files = {p.stem for p in (SRC / "commands").glob("*.py") if not p.stem.startswith("_")}
    assert files == {n.replace("-", "_") for n in names}
    # the library holds no argparse entry points any more
    for m, path in _modules().items():
        if not (m.startswith("fvlm.commands") or m == "fvlm.cli"):
            assert not re.search(r"def run_\w*_cli\(", path.read_text()), m


def test_the_global_mode_is_read_in_one_place():
    readers = [m for m, p in _modules().items()
               if re.search(r"loss\.mode\s*==", p.read_text()) and m not in {"fvlm.config"}]
    assert readers == ["fvlm.anatomy"]


def test_long_modules_say_why():
    unexplained = {}
    for module, path in _modules().items():
        text = path.read_text()
        n = len(text.splitlines())
        if n > MAX_LINES and not re.search(r"\blines\b", ast.get_docstring(ast.parse(text)) or ""):
            unexplained[module] = n
    assert unexplained == {}
