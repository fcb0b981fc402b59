"""The package's layering: a stage never borrows from another stage. What stages share lives below them
(`samples`, `metrics`, `outputs`, `rollout`, `training`, ...); only the orchestrators (`spa selfplay`, `spa run`,
`spa demo`, the CLI) put stages together. The imports are read from the source, so one added anywhere in a module
(inside a function too) is caught."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "spa_rl"
STAGES = {
    "spa_rl.collect": "collect.py",
    "spa_rl.sft": "sft.py",
    "spa_rl.rl.trainer": "rl/trainer.py",
    "spa_rl.evaluation": "evaluation.py",
    "spa_rl.imagine": "imagine.py",
}
ORCHESTRATORS = ("spa_rl.selfplay", "spa_rl.pipeline", "spa_rl.cli", "spa_rl.demo")


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (`from spa_rl import sft` names spa_rl.sft)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_imports_another_stage(stage):
    others = set(STAGES) - {stage}
    borrowed = sorted(m for m in imported_modules(SRC / STAGES[stage]) if m in others)
    assert not borrowed, f"{stage} imports the stage(s) {borrowed}: move what they share below both"


def test_the_layering_test_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from spa_rl.sft import train_sft\n    import spa_rl.collect\n")
    assert {"spa_rl.sft", "spa_rl.collect"} <= imported_modules(module)


def test_only_orchestrators_import_stages():
    """Modules below the stages (everything but the stages and the orchestrators) import no stage."""
    for path in SRC.rglob("*.py"):
        name = "spa_rl." + ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        if name in STAGES or name.startswith(ORCHESTRATORS) or name == "spa_rl.__main__":
            continue
        borrowed = sorted(m for m in imported_modules(path) if m in STAGES)
        assert not borrowed, f"{name} (below the stages) imports the stage(s) {borrowed}"
