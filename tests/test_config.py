import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from maprl.config import Params, load_params, parse_params
from maprl.errors import ParamsError

REPO = Path(__file__).resolve().parents[1]

BAD = [
    ({"tile": {"test_fraction": 1.5}}, "tile.test_fraction"),
    ({"tile": {"test_fraction": "lots"}}, "tile.test_fraction"),
    ({"tile": {"mode": "diagonal"}}, "tile.mode"),
    ({"tile": {"n_targets": 1}}, "tile.n_targets"),
    ({"tile": {"view_size": 224, "block_size": 100}}, "block_size"),
    ({"tile": {"colour": "red"}}, "tile.colour"),
    ({"fetch": {"source": "ftp"}}, "fetch.source"),
    ({"fetch": {"size": 10}}, "fetch.size"),
    ({"fetch": {"source": "file"}}, "fetch.path"),
    ({"fetch": {"earthengine": {"bbox": [7, 46, 6, 47]}}}, "bbox"),
    ({"fetch": {"earthengine": {"credentials": "service_account"}}}, "key_file"),
    ({"base": {"seed": -3}}, "base.seed"),
    ({"base": {"sed": 3}}, "base.sed"),
    ({"env": {"action_step": 0}}, "env.action_step"),
    ({"env": {"success_threshold": 0.5}}, "env.success_threshold"),
    ({"env": {"bonus_scale": float("inf")}}, "env.bonus_scale"),
    ({"evaluate": {"success_radius": float("inf")}}, "evaluate.success_radius"),
    ({"evaluate": {"distance_bins": [250, float("nan")]}}, "evaluate.distance_bins"),
    ({"train": {"shaping": float("inf")}}, "train.shaping"),
    ({"train": {"learning_rate": float("nan")}}, "train.learning_rate"),
    ({"trian": {}}, "trian"),
    ({"train": {"batch_size": 4096, "n_steps": 8, "n_envs": 2}}, "batch_size"),
    ({"train": {"gamma": 1.0}}, "train.gamma"),
    ({"agent": {"memory": "lstm"}}, "agent.memory"),
    ({"evaluate": {"success_radius": 0}}, "evaluate.success_radius"),
    ({"fetch": {"earthengine": {"start_date": "2023-10-01"}}}, "must come before end_date"),
    ({"fetch": {"earthengine": {"end_date": "2023-13-45"}}}, "end_date '2023-13-45' is not a date"),
]


@pytest.mark.parametrize(("raw", "key"), BAD)
def test_bad_params_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert key in str(err.value)


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(ParamsError, match="mapping"):
        parse_params([1, 2])


def test_invalid_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("tile: {n_targets: [\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "space":
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_repo_params_equal_the_documented_defaults() -> None:
    """params.yaml is the README table's defaults, key for key (so the table is true of the repo)."""
    repo, defaults = _flat(load_params(REPO / "params.yaml").model_dump()), _flat(Params().model_dump())
    assert {k: (repo[k], defaults[k]) for k in defaults if repo[k] != defaults[k]} == {}
    assert set(_flat(yaml.safe_load((REPO / "params.yaml").read_text()))) - {"tune.space"} <= set(defaults)


def test_readme_params_table_is_current() -> None:
    from maprl.config import params_table

    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- params:start -->\n")[1].split("\n<!-- params:end -->")[0]
    assert block == params_table(), "README params table is stale: run `maprl params-table`"


def test_readme_results_fills_an_empty_block_and_replaces_a_full_one() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_results", REPO / "scripts" / "readme_results.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    empty = "a\n<!-- results:x:start -->\n<!-- results:x:end -->\nb"
    full = "a\n<!-- results:x:start -->\n| old |\n| rows |\n<!-- results:x:end -->\nb"
    want = "a\n<!-- results:x:start -->\n| new |\n<!-- results:x:end -->\nb"
    assert mod.render(empty, {"x": "| new |"}) == want and mod.render(full, {"x": "| new |"}) == want


def test_readme_result_tables_are_the_committed_metrics() -> None:
    """scripts/readme_results.py writes the README's result tables from metrics/*.json; they must agree."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "readme_results.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("algo", ["a2c", "sac"])
def test_an_agent_variant_is_validated_again_naming_what_does_not_fit(algo: str) -> None:
    """The search agent turns the PPO warm start on, so another algo is refused there, and only there."""
    from maprl.config import agent_variant

    params = parse_params({"train": {"algo": algo}})
    with pytest.raises(
        ParamsError, match=rf"the search agent.*\n  train: .*clones the scripted search into PPO, not {algo}"
    ):
        agent_variant(params, "search")
    assert agent_variant(params, "memory").train.algo == algo
