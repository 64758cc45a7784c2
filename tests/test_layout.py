"""The house rules of the source tree (docs/architecture.md): rooms, one-way imports, thin scripts, one command.

Read from the source with `ast` (nothing is imported), so a rule broken anywhere fails here with the file and line.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("calibration", "exporter", "engines")
# room -> the rooms it may import (besides itself); a room is `package.subpackage`, or a package's leaf module
ALLOWED = {
    "calibration": set(),
    "exporter.errors": set(),
    "exporter.models": {"exporter.errors", "calibration"},
    "exporter.onnx": {"exporter.models", "exporter.errors", "calibration"},
    "exporter.passes": {"exporter.onnx", "exporter.models", "exporter.errors", "calibration"},
    "exporter.tensorrt": {"exporter.passes", "exporter.onnx", "exporter.models", "exporter.errors", "calibration"},
    "exporter.stages": {"exporter.tensorrt", "exporter.passes", "exporter.onnx", "exporter.models", "exporter.errors",
                        "calibration"},
    "engines.runtime": {"exporter", "calibration"},
    "engines.calibrate": {"engines.runtime", "exporter", "calibration"},
    "engines.evaluation": {"engines.calibrate", "engines.runtime", "exporter", "calibration"},
    "engines.serving": {"engines.runtime", "exporter", "calibration"},
    "engines.cli": {"engines.evaluation", "engines.serving", "engines.calibrate", "engines.runtime", "exporter",
                    "calibration"},
}
LEAVES = {"exporter": {"__init__.py", "errors.py"}, "engines": {"__init__.py"}}


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def dotted(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    return parts[0] if parts[0] == "calibration" else ".".join(parts[:2])


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, []) for a in node.names)
    return found


def test_every_module_lives_in_a_room_with_a_docstring():
    for pkg, allowed in LEAVES.items():
        loose = sorted(p.name for p in (ROOT / pkg).glob("*.py") if p.name not in allowed)
        assert not loose, f"{pkg}/ holds modules outside a subpackage: {loose}"
    for pkg in ("exporter", "engines"):
        for sub in sorted(p for p in (ROOT / pkg).iterdir() if p.is_dir() and p.name != "__pycache__"):
            init = sub / "__init__.py"
            assert init.exists(), f"{sub} is not a package"
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc and "May import" in doc, f"{init}: its docstring must say what the room holds and may import"
            assert f"{pkg}.{sub.name}" in ALLOWED, f"{pkg}.{sub.name} has no import rule in this test"


def test_imports_point_one_way_and_no_private_name_crosses_a_module():
    broken = []
    for path in modules():
        here = dotted(path)
        mine = room(here)
        for line, module, names in imports(path):
            top = module.split(".")[0]
            if top == "scripts":
                broken.append(f"{path.relative_to(ROOT)}:{line} imports scripts")
            if top not in PACKAGES:
                continue
            target = room(module) if module.count(".") or top == "calibration" else module
            ok = (target == mine or target in ALLOWED[mine] or top in ALLOWED[mine]
                  or (target in PACKAGES and any(r.startswith(target) for r in ALLOWED[mine] | {mine})))
            if not ok:
                broken.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {module}")
            if module != here:
                broken += [f"{path.relative_to(ROOT)}:{line} imports private {module}.{n}"
                           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not broken, "\n".join(broken)


def test_scripts_are_thin_and_tests_never_import_them():
    for script in sorted((ROOT / "scripts").glob("*.py")):
        text = script.read_text()
        assert len(text.splitlines()) <= 100, f"{script.name}: {len(text.splitlines())} lines"
        assert "sys.path" not in text, f"{script.name} edits sys.path"
    for test in sorted((ROOT / "tests").glob("*.py")):
        bad = [f"{test.name}:{line}" for line, module, _ in imports(test) if module.split(".")[0] == "scripts"]
        assert not bad, f"tests import scripts: {bad}"


def test_quadit_lists_the_commands_and_runs_the_scripts_code():
    from engines.cli.main import COMMANDS

    quadit = [sys.executable, "-m", "engines.cli.main"]
    listing = subprocess.run([*quadit, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert listing.returncode == 0
    for command in ("calibrate", "export", "check", "build-engines", "generate", "serve", "bench", "compare"):
        assert f"\n  {command} " in listing.stdout, command
        assert command in COMMANDS
    ours = subprocess.run([*quadit, "export", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    script = subprocess.run([sys.executable, "scripts/export.py", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert ours.returncode == script.returncode == 0
    assert ours.stdout == script.stdout and "--scheme" in ours.stdout
    unknown = subprocess.run([*quadit, "exprot"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert unknown.returncode == 2 and "invalid choice: 'exprot'" in unknown.stderr


@pytest.mark.parametrize("config", ["pyproject.toml"])
def test_ruff_is_configured_for_lint_and_import_order(config):
    import tomllib

    lint = tomllib.loads((ROOT / config).read_text())["tool"]["ruff"]["lint"]
    assert {"E", "F", "I"} <= set(lint["select"])
