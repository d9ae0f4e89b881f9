"""flows/ is a pure torch library: it must import none of ray, mlflow, webdataset, torch.distributed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("ray", "mlflow", "webdataset", "torch.distributed")
FLOWS = Path(__file__).resolve().parents[3] / "flows"


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_no_forbidden_imports_in_source() -> None:
    files = sorted(FLOWS.rglob("*.py"))
    assert files, "flows/ has no Python files"
    bad = [
        f"{f.relative_to(FLOWS.parent)}: {name}"
        for f in files
        for name in _imported_modules(f)
        if any(name == m or name.startswith(m + ".") for m in FORBIDDEN)
    ]
    assert not bad, f"flows/ imports forbidden modules: {bad}"


def test_importing_flows_loads_none_of_them() -> None:
    # `import torch` alone loads torch.distributed; what matters is what flows adds on top.
    code = (
        "import sys, torch; before = set(sys.modules); import flows; "
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules and m not in before]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=FLOWS.parent)
    assert result.returncode == 0, f"importing flows pulled in: {result.stdout} {result.stderr}"
