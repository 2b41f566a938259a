"""dvc.yaml declares, for every stage, exactly the project modules its entry point imports (transitively)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from helpers import REPO

PACKAGE = "pipeline"


def module_file(name: str, root: Path = REPO) -> Path | None:
    """pipeline.a.b -> pipeline/a/b.py or pipeline/a/b/__init__.py (None when not a project module)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    path = root.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """Every project module an import statement anywhere in `path` names (function-level ones included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(root).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return {n for n in names if module_file(n, root) is not None}


def closure(entry_modules: list[str], root: Path = REPO) -> set[str]:
    """Repo-relative files of the entry modules and everything they import, with their packages' __init__.py."""
    seen: set[str] = set()
    todo = list(entry_modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b.c runs a and a.b
        todo.extend(imported_modules(module_file(name, root), root))
    return {module_file(n, root).relative_to(root).as_posix() for n in seen}


def entry_modules(cmd: str) -> list[str]:
    """The modules a dvc.yaml cmd runs: `python -m pipeline.stages.X` or `python -m pipeline.launch X`."""
    m = re.fullmatch(r"python -m (pipeline\.stages\.\w+)", cmd)
    if m:
        return [m.group(1)]
    m = re.fullmatch(r"python -m pipeline\.launch (\w+)", cmd)
    if m:
        return ["pipeline.launch", f"pipeline.stages.{m.group(1)}"]
    raise AssertionError(f"unexpected stage cmd {cmd!r}")


def declared_code(stage: dict, root: Path = REPO) -> set[str]:
    """The .py files a stage's deps name (directories expanded), ignoring data deps."""
    files: set[str] = set()
    for dep in stage.get("deps", []):
        if not dep.startswith(f"{PACKAGE}/"):
            continue
        path = root / dep
        if path.is_dir():
            files.update(p.relative_to(root).as_posix() for p in path.rglob("*.py"))
        else:
            files.add(dep)
    return files


def stages(root: Path = REPO) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", list(stages()))
def test_stage_deps_are_its_import_closure(name):
    stage = stages()[name]
    needed = closure(entry_modules(stage["cmd"]))
    declared = declared_code(stage)
    fix = "; run `python tests/test_dvc_deps.py --fix`"
    assert not needed - declared, f"{name}: dvc.yaml misses deps {sorted(needed - declared)}{fix}"
    assert not declared - needed, f"{name}: dvc.yaml declares deps the stage never imports {sorted(declared - needed)}{fix}"


def test_the_check_fails_when_a_dep_is_removed(tmp_path):
    stage = dict(stages()["train_temporal"])
    needed = closure(entry_modules(stage["cmd"]))
    stage["deps"] = [d for d in stage["deps"] if d != "pipeline/losses.py"]
    assert "pipeline/losses.py" in needed - declared_code(stage)


def test_code_deps_are_files_not_directories():
    """A directory dep would also hash __pycache__ and files no stage imports."""
    for name, stage in stages().items():
        dirs = [d for d in stage.get("deps", []) if d.startswith(f"{PACKAGE}/") and (REPO / d).is_dir()]
        assert not dirs, f"{name}: list the modules, not directories {dirs}"


def rewrite_code_deps(root: Path = REPO) -> bool:
    """Rewrite dvc.yaml's code deps (the `- pipeline/...` lines) to each stage's import closure; True if changed."""
    text = (root / "dvc.yaml").read_text()
    all_stages = stages(root)
    out, stage, in_deps, wrote = [], None, False, False
    for line in text.split("\n"):
        m = re.match(r"^  (\w+):$", line)
        if m and m.group(1) in all_stages:
            stage, in_deps = m.group(1), False
        if re.match(r"^    deps:$", line):
            in_deps, wrote = True, False
            out.append(line)
            continue
        if in_deps and re.match(r"^      - ", line):
            if line.strip().startswith(f"- {PACKAGE}/"):
                if not wrote:
                    out += [f"      - {f}" for f in sorted(closure(entry_modules(all_stages[stage]["cmd"]), root))]
                    wrote = True
                continue
        elif in_deps:
            if not wrote:
                out += [f"      - {f}" for f in sorted(closure(entry_modules(all_stages[stage]["cmd"]), root))]
                wrote = True
            in_deps = False
        out.append(line)
    new = "\n".join(out)
    (root / "dvc.yaml").write_text(new)
    return new != text


if __name__ == "__main__":  # python tests/test_dvc_deps.py --fix: write the closures into dvc.yaml
    import sys

    sys.path.insert(0, str(REPO))
    if sys.argv[1:] != ["--fix"]:
        raise SystemExit("usage: python tests/test_dvc_deps.py --fix")
    print("dvc.yaml code deps", "rewritten" if rewrite_code_deps() else "already exact")
