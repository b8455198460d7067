"""omnicore stays pure: no torch.distributed, no omnicore_dist, no test-only reference libraries, no pickles.

`import torch` itself loads torch.distributed, so that rule is checked on omnicore's source (every
import statement, parsed); the reference libraries are also checked at run time, after a forward pass.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch.distributed", "omnicore_dist", "transformers", "peft", "qwen_omni_utils", "librosa")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_omnicore_source_imports_nothing_forbidden():
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "omnicore").rglob("*.py"))
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert not offenders, offenders


def test_no_pickle_loading_in_omnicore():
    calls = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "omnicore").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in ("load", "loads", "Unpickler")
        and isinstance(node.value, ast.Name) and node.value.id in ("pickle", "torch", "cPickle", "dill")
    ]
    assert not calls, calls


def test_reference_libraries_are_not_loaded_at_run_time():
    code = (
        "import sys, torch, omnicore\n"
        "p = omnicore.init_thinker(omnicore.TINY, seed=0)\n"
        "b = {'input_ids': torch.tensor([[1, 2, 3]]), 'labels': torch.tensor([[1, 2, 3]])}\n"
        "omnicore.thinker_loss(p, omnicore.TINY, b)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN[2:]!r}]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
