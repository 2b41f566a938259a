"""The README documents every param in params.yaml, and every dvc.yaml stage runs a stage module."""
import re

import yaml

from helpers import REPO


def leaf_keys(node, prefix=""):
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from leaf_keys(value, dotted + ".")
        else:
            yield dotted


def documented_keys(readme: str) -> tuple[set[str], set[str]]:
    """Backticked names in the README, with `a.b/c` expanded to a.b and a.c; `a.*` kept as a prefix."""
    names, prefixes = set(), set()
    for token in re.findall(r"`([a-z_]+(?:\.[a-z_0-9*]+(?:/[a-z_0-9]+)*)+)`", readme):
        if token.endswith(".*"):
            prefixes.add(token[:-1])
            continue
        head, _, last = token.rpartition(".")
        names.update(f"{head}.{part}" for part in last.split("/"))
    return names, prefixes


def test_every_param_is_documented():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    names, prefixes = documented_keys((REPO / "README.md").read_text())
    missing = [k for k in leaf_keys(params) if k != "device" and k not in names
               and not any(k.startswith(p) for p in prefixes)]
    assert not missing, f"README.md does not document: {missing}"


def test_every_stage_has_a_module():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        assert stage["cmd"] in (f"python -m pipeline.stages.{name}", f"python -m pipeline.launch {name}"), stage["cmd"]
        assert (REPO / "pipeline" / "stages" / f"{name}.py").is_file()
