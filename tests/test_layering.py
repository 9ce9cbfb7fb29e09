"""Imports run only downstream in the data flow (DEVELOPERS.md, "Layering").

Every import in the project's packages, lazy ones inside functions included, is read from the
source and must name a module of its own layer or of a layer before it:

    schema, configuration, artifacts -> data sets -> pipelines -> trainer -> index
    -> batch jobs over a trained tower and its index -> serving -> the retraining pipeline,
    experiments and command lines

Offline mining is a Beam pipeline (it lives beside the other pipelines), but it runs on a trained
query tower and its index, so its layer comes after both.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ebr", "beam_pipelines", "trainer", "index", "serving", "retraining", "experiments")

# (layer, module prefixes); a module's layer is that of its longest matching prefix.
LAYERS = (
    ("schema, configuration and artifacts", ("ebr",)),
    ("data sets", ("ebr.datasets",)),
    ("pipelines", ("beam_pipelines",)),
    ("trainer", ("trainer",)),
    ("index", ("index",)),
    ("batch jobs over a trained tower and its index",
     ("beam_pipelines.mining", "beam_pipelines.mine_negatives")),
    ("serving", ("serving",)),
    ("pipelines of stages, experiments and command lines",
     ("retraining", "experiments", "ebr.cli", "ebr.demo")),
)
TOP = len(LAYERS) - 1


def layer(module: str) -> int:
    if module.endswith(".cli"):  # each component's command line sits on top of everything
        return TOP
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module in `path`, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if is_module(f"{node.module}.{a.name}")
                     else node.module for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return out


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                  if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))


def test_every_module_has_a_layer():
    assert [module_name(p) for p in sources() if layer(module_name(p)) < 0] == []


def test_imports_run_only_downstream():
    upward = []
    for path in sources():
        me = module_name(path)
        for line, name in imports(path):
            if layer(name) > layer(me):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {me} ({LAYERS[layer(me)][0]}) "
                              f"imports {name} ({LAYERS[layer(name)][0]})")
    assert upward == [], "imports that run upstream:\n" + "\n".join(upward)


@pytest.mark.parametrize("module, expected", [
    ("ebr.features", 0), ("ebr.datasets.social", 1), ("beam_pipelines.examples", 2),
    ("beam_pipelines.mine_negatives", 5), ("serving.cli", TOP), ("experiments.ablations", TOP),
])
def test_layer_table(module, expected):
    assert layer(module) == expected


def test_the_check_sees_lazy_imports(tmp_path):
    # An upward import inside a function is found, so the test above can fail.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from serving import cli\n    import index.exact\n")
    assert imports(probe) == [(2, "serving.cli"), (3, "index.exact")]
    assert layer("serving.cli") > layer("index.exact") > layer("trainer.model")
