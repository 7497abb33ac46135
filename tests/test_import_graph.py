"""The stages import one way (``wsi, radiology ← mil ← spatial ← workflows``) and only through
each other's public names.

Walks every module's AST (imports inside functions included), resolves relative imports, and
fails on an import of a later stage, of a stage under its bare folder name (``import wsi``), or of
a private name of another stage (``oncotrace.wsi._store``, ``from oncotrace.spatial._heatmap
import …``, ``from oncotrace.wsi import _backends``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import oncotrace
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: rank of each stage: a module may import stages of lower or equal rank only
RANK = {"wsi": 0, "radiology": 0, "mil": 1, "spatial": 2, "workflows": 3}
STAGES = [s for s in RANK if (ROOT / s / "__init__.py").is_file()]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["oncotrace", *parts])


def _imports(source: str, module: str, *, is_package: bool) -> list[tuple[int, str, str | None]]:
    """(line, absolute module, imported name or None) for every import in ``source``."""
    tree = ast.parse(source)
    package = module if is_package else module.rsplit(".", 1)[0]
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.extend((node.lineno, target, alias.name) for alias in node.names)
    return found


def _violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    own = module.split(".")[1]
    out = []
    for line, target, name in _imports(source, module, is_package=is_package):
        where = f"{module}:{line}"
        parts = target.split(".")
        if parts[0] in RANK:
            out.append(f"{where}: bare stage import {target!r} (write oncotrace.{target})")
            continue
        if parts[0] != "oncotrace" or len(parts) < 2 or parts[1] not in RANK:
            continue
        stage = parts[1]
        if RANK[stage] > RANK[own] or (stage != own and RANK[stage] == RANK[own]):
            out.append(f"{where}: {own} imports the later (or sibling) stage {target}")
        if stage == own:
            continue
        private = [p for p in parts[2:] if p.startswith("_")]
        if private or (name is not None and name.startswith("_")):
            shown = f"{target}.{name}" if name else target
            out.append(f"{where}: private name of another stage: {shown}")
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_only_earlier_stages_and_their_public_names(stage: str) -> None:
    files = sorted((ROOT / stage).rglob("*.py"))
    assert files, f"no modules under {stage}/"
    problems = [
        v
        for f in files
        for v in _violations(f.read_text(), _module_name(f), is_package=f.name == "__init__.py")
    ]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_it_should() -> None:
    # planted violations in a fake `mil` module: each kind must be reported, clean lines not
    src = (
        "from oncotrace.wsi import open_slide\n"  # fine
        "from . import _heads\n"  # fine: own stage
        "from oncotrace.spatial import Heatmap\n"  # later stage
        "from oncotrace.wsi._store import fast_codecs\n"  # private module
        "from oncotrace.wsi import _backends\n"  # private name
        "import wsi\n"  # bare name
        "def f():\n    import oncotrace.workflows.cli\n"  # later stage, inside a function
    )
    found = _violations(src, "oncotrace.mil._planted")
    lines = sorted(int(v.split(":")[1]) for v in found)
    assert lines == [3, 4, 5, 6, 8], found


def test_the_root_package_imports_no_stage() -> None:
    root_init = Path(oncotrace.__file__)
    targets = [t for _, t, _ in _imports(root_init.read_text(), "oncotrace", is_package=True)]
    assert not [t for t in targets if t.startswith("oncotrace.")], targets
