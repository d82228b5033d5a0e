"""Every maprl module a stage can import is a dependency of that stage in dvc.yaml.

The closure is static: every ``import maprl...`` / ``from maprl... import`` in the stage script
and, recursively, in each module it reaches, including imports inside functions (lazy ones), so
editing any file a stage may run reruns that stage.
"""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """maprl modules named by the imports of one file (with their parent packages)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("maprl")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maprl"):
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from maprl.data import geo`
    out = set()
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {n for n in out if _module_file(n) is not None}


def closure(script: Path) -> set[Path]:
    """Files of every maprl module reachable from ``script``."""
    seen: set[str] = set()
    todo = list(_imports(script))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += list(_imports(_module_file(name)))  # type: ignore[arg-type]
    return {_module_file(n).relative_to(REPO) for n in seen}  # type: ignore[union-attr]


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_every_module_it_imports(stage: str) -> None:
    spec = STAGES[stage]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec["deps"]]
    script = REPO / "pipeline" / f"{stage}.py"
    assert f"pipeline/{stage}.py" in deps
    missing = sorted(str(p) for p in closure(script) if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} misses deps: {missing}"


def test_closure_sees_lazy_imports() -> None:
    """The fetch stage reaches Earth Engine only inside a function; the closure still finds it."""
    assert Path("maprl/data/earthengine.py") in closure(REPO / "pipeline" / "fetch.py")


NOT_READ_BY_TUNE = {
    "hparams", "worlds", "init_from", "imitate", "imitate_rounds", "total_timesteps", "curriculum_success", "eval_freq",
    "eval_episodes", "checkpoint_freq", "resume", "tensorboard", "progress_bar", "workers",
}  # fmt: skip
"""train keys a tune trial does not read: the train stage's budget, worlds, warm start and bookkeeping."""


def test_tune_depends_on_every_train_key_a_trial_reads_and_on_no_other() -> None:
    """So that `dvc exp run -S train.worlds=16` (or another budget) does not rerun the study."""
    from maprl.config import TrainParams

    listed = {p.removeprefix("train.") for p in STAGES["tune"]["params"] if p.startswith("train.")}
    assert "train" not in STAGES["tune"]["params"]
    assert listed.isdisjoint(NOT_READ_BY_TUNE)
    assert listed | NOT_READ_BY_TUNE == set(TrainParams.model_fields), "classify the new train key here and in dvc.yaml"
