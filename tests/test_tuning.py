"""The tune stage: the annealing sampler, search-space validation, pruning, resume and outputs.

Analytic objectives only, except one micro study (a few hundred PPO timesteps on a tiny map).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from maprl.config import HPARAM_KEYS, TuneParams, parse_params
from maprl.data.geo import MapData
from maprl.errors import InputError, ParamsError
from maprl.learn.training import load_best_hparams
from maprl.learn.tuning import (
    ALIASES,
    AnnealSampler,
    TrialEval,
    count_finished,
    hparams_from_params,
    make_sampler,
    make_storage,
    objective,
    optimize_study,
    reap_orphans,
    report,
    run_tune,
    run_tune_stage,
    space_distributions,
    study_for,
    suggest_hparams,
    write_best_hparams,
)
from maprl.nav.runtime import Runtime, pooled_memory
from maprl.nav.scene import Scene

from conftest import grid_targets, tiny_params

optuna.logging.set_verbosity(optuna.logging.WARNING)


def mixed(trial: optuna.Trial) -> float:
    """A shifted quadratic over a float, a log-float, an int and a numeric categorical (max 0)."""
    x = trial.suggest_float("x", -5, 5)
    lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
    n = trial.suggest_int("n", 1, 20)
    c = trial.suggest_categorical("c", [16, 32, 64, 128, 256])
    return -((x - 1.3) ** 2 + (math.log10(lr) + 3.2) ** 2 + ((n - 7) / 4) ** 2 + 0.5 * (math.log2(c) - 6) ** 2)


def best_of(sampler: optuna.samplers.BaseSampler, n: int, func: Any = mixed) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(func, n_trials=n)
    return study


# -- the sampler -------------------------------------------------------------------------------------
def test_anneal_beats_random_on_average() -> None:
    n, seeds = 40, range(6)
    anneal = [best_of(AnnealSampler(seed=s, n_trials=n), n).best_value for s in seeds]
    random = [best_of(optuna.samplers.RandomSampler(seed=s), n).best_value for s in seeds]
    assert np.mean(anneal) > np.mean(random) + 0.3, (anneal, random)


def test_anneal_minimises_too() -> None:
    n, seeds = 40, range(4)

    def minimised(sampler: optuna.samplers.BaseSampler) -> float:
        study = optuna.create_study(direction="minimize", sampler=sampler)
        study.optimize(lambda t: -mixed(t), n_trials=n)
        return study.best_value

    anneal = [minimised(AnnealSampler(seed=s, n_trials=n)) for s in seeds]
    random = [minimised(optuna.samplers.RandomSampler(seed=s)) for s in seeds]
    assert np.mean(anneal) < np.mean(random) - 0.3, (anneal, random)


def test_anneal_same_seed_same_sequence() -> None:
    def seq(seed: int) -> list[dict[str, Any]]:
        return [t.params for t in best_of(AnnealSampler(seed=seed, n_trials=15), 15).trials]

    assert seq(3) == seq(3)
    assert seq(3) != seq(4)


def test_anneal_types_and_bounds() -> None:
    seen: list[dict[str, Any]] = []

    def f(trial: optuna.Trial) -> float:
        p: dict[str, Any] = {
            "f": trial.suggest_float("f", -1.0, 2.0),
            "flog": trial.suggest_float("flog", 1e-6, 1e-1, log=True),
            "fstep": trial.suggest_float("fstep", 0.1, 0.9, step=0.2),
            "i": trial.suggest_int("i", 3, 10),
            "istep": trial.suggest_int("istep", 2, 20, step=3),
            "ilog": trial.suggest_int("ilog", 1, 1024, log=True),
            "cnum": trial.suggest_categorical("cnum", [64, 128, 256]),
            "cstr": trial.suggest_categorical("cstr", ["a", "b", "c"]),
        }
        seen.append(p)
        return -((p["f"] - 1) ** 2) - p["i"] / 10 + (p["cstr"] == "b")

    best_of(AnnealSampler(seed=0, n_trials=40), 40, f)
    for p in seen:
        assert isinstance(p["f"], float) and -1.0 <= p["f"] <= 2.0
        assert isinstance(p["flog"], float) and 1e-6 <= p["flog"] <= 1e-1
        assert min(abs(p["fstep"] - v) for v in (0.1, 0.3, 0.5, 0.7, 0.9)) < 1e-9
        assert isinstance(p["i"], int) and 3 <= p["i"] <= 10
        assert isinstance(p["istep"], int) and p["istep"] in range(2, 21, 3)
        assert isinstance(p["ilog"], int) and 1 <= p["ilog"] <= 1024
        assert p["cnum"] in (64, 128, 256) and isinstance(p["cnum"], int)
        assert p["cstr"] in ("a", "b", "c")
    assert len({p["cstr"] for p in seen}) == 3 and len({p["cnum"] for p in seen}) >= 2
    assert len({p["i"] for p in seen}) > 3  # the chain moves


def test_anneal_survives_running_and_pruned_trials() -> None:
    sampler = AnnealSampler(seed=1, n_trials=30)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(mixed, n_trials=5)
    running = [study.ask() for _ in range(3)]  # parallel workers' trials, never told
    for t in running:
        mixed(t)
    pruned = study.ask()
    mixed(pruned)
    pruned.report(1e9, 0)  # a huge partial value must not become the chain's state
    study.tell(pruned, state=TrialState.PRUNED)
    study.optimize(mixed, n_trials=10, n_jobs=2)  # threads: more RUNNING trials while sampling
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 15
    assert sum(t.state == TrialState.RUNNING for t in study.trials) == 3
    state = sampler.current_state(study)
    assert state is not None and state.state == TrialState.COMPLETE


def test_anneal_starts_uniform_without_complete_trials() -> None:
    sampler = AnnealSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    t = study.ask()
    t.suggest_float("x", 0, 1)
    study.tell(t, state=TrialState.PRUNED)
    assert sampler.current_state(study) is None
    study.optimize(lambda tr: tr.suggest_float("x", 0, 1), n_trials=3)
    assert len(study.trials) == 4


@pytest.mark.parametrize("name", ["anneal", "tpe", "random"])
def test_make_sampler(name: str) -> None:
    assert isinstance(make_sampler(name, 0, 10), optuna.samplers.BaseSampler)


# -- search space ----------------------------------------------------------------------------------
def test_default_space_is_valid_and_maps_to_hparams() -> None:
    space = TuneParams().space
    assert TuneParams.check_space(space) == TuneParams.check_space(TuneParams.check_space(space))
    hp = suggest_hparams(optuna.trial.FixedTrial({**_first_values(space), "one_minus_gamma": 0.02}), space)
    assert set(hp) <= set(HPARAM_KEYS)
    assert hp["gamma"] == pytest.approx(0.98)
    assert isinstance(hp["n_steps"], int) and isinstance(hp["n_epochs"], int)


def _first_values(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name, d in space_distributions(space).items():
        out[name] = d.choices[0] if isinstance(d, optuna.distributions.CategoricalDistribution) else d.low  # type: ignore[attr-defined]
    return out


def test_power_of_two_range_is_sampled_on_the_exponent() -> None:
    p = parse_params({"tune": {"space": {"n_steps": {"low": 32, "high": 512}, "gamma": {"low": 0.9, "high": 0.999}}}})
    dists = space_distributions(p.tune.space)
    assert dists["log2_n_steps"] == optuna.distributions.IntDistribution(5, 9)
    hp = hparams_from_params({"log2_n_steps": 7, "gamma": 0.95})
    assert hp == {"n_steps": 128, "gamma": 0.95}


def test_space_names_match_training_hparams() -> None:
    with pytest.raises(ValueError, match="allowed: ") as err:
        TuneParams.check_space({"nope": {"low": 0, "high": 1}})
    allowed = set(str(err.value).split("allowed: ")[1].split(", "))
    assert allowed == set(HPARAM_KEYS) | set(ALIASES)


@pytest.mark.parametrize(
    ("space", "match"),
    [
        ({"learning_rate": {"low": 1e-2, "high": 1e-3}}, r"space\.learning_rate: low \(0\.01\) > high"),
        (
            {"learning_rat": {"low": 1e-4, "high": 1e-3}, "foo": {"choices": [1]}},
            r"unknown hyperparameter\(s\) foo, learning_rat",
        ),
        ({"n_steps": {"choices": [64, 100]}}, r"space\.n_steps: choices must be powers of two.*100"),
        ({"batch_size": {"low": 64, "high": 1000}}, r"space\.batch_size: low and high must be powers of two.*1000"),
        ({"n_epochs": {"low": 2.5, "high": 5}}, r"space\.n_epochs: n_epochs takes integers"),
        ({"clip_range": {"low": 0.1}}, r"space\.clip_range needs low and high"),
        ({"ent_coef": {"low": 0, "high": 0.1, "log": True}}, r"space\.ent_coef: log: true needs low > 0"),
        ({"gamma": {"low": 0.9, "high": 1.2}}, r"space\.gamma: gamma must be in \(0, 1\]"),
        ({"gamma": {"choices": [0.9]}, "one_minus_gamma": {"choices": [0.1]}}, r"gamma or one_minus_gamma, not both"),
        ({"gae_lambda": {"lo": 0.9, "high": 0.99}}, r"space\.gae_lambda: unknown field\(s\) lo"),
        ({"learning_rate": {"low": "fast", "high": 1e-3}}, r"space\.learning_rate\.low must be a number"),
    ],
)
def test_bad_space_names_the_key(space: dict[str, Any], match: str) -> None:
    with pytest.raises(ParamsError, match=match):
        parse_params({"tune": {"space": space}})


def test_yaml_style_numbers_and_other_tune_checks() -> None:
    raw = yaml.safe_load("tune: {space: {learning_rate: {low: 1e-4, high: 3e-3, log: true}}}")
    assert parse_params(raw).tune.space["learning_rate"]["low"] == pytest.approx(1e-4)  # YAML 1.1 reads a string
    with pytest.raises(ParamsError, match="grace_period"):
        parse_params({"tune": {"heartbeat_interval": 30, "grace_period": 10}})
    with pytest.raises(ParamsError, match="unsupported URL scheme 'redis'"):
        parse_params({"tune": {"storage": "redis://localhost"}})


# -- pruning and divergence ------------------------------------------------------------------------
def test_median_pruner_prunes_a_hopeless_trial() -> None:
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    study = optuna.create_study(direction="maximize", pruner=pruner, sampler=AnnealSampler(seed=0))

    def curve(level: float) -> Any:
        def f(trial: optuna.Trial) -> float:
            trial.suggest_float("x", 0, 1)
            for step in range(3):
                report(trial, level * (step + 1), step, prune=step < 2)
            return level * 3

        return f

    study.optimize(curve(1.0), n_trials=3)
    study.optimize(curve(0.01), n_trials=1)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    assert list(study.trials[-1].intermediate_values) == [0, 1]  # warmup: report 0 is never pruned


def test_trial_eval_callback_reports_and_prunes() -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(0, 0))
    study.optimize(lambda t: report(t, 1.0, 0), n_trials=1)
    trial = study.ask()
    cb = TrialEval(trial, lambda model: 0.0, every=100, n_reports=2)
    cb.model = None  # type: ignore[assignment]  # set by SB3's init_callback in real use
    cb.num_timesteps = 50
    assert cb._on_step() and cb.reports == 0
    cb.num_timesteps = 100
    with pytest.raises(optuna.TrialPruned):
        cb._on_step()


def test_nan_is_pruned_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    import maprl.learn.tuning as tuning

    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: report(t, float("nan"), 0), n_trials=1)
    assert study.trials[-1].state == TrialState.PRUNED

    def diverge(*args: Any) -> float:
        raise ValueError("Expected parameter loc of distribution Normal to satisfy Real(), but found invalid values:")

    monkeypatch.setattr(tuning, "_train_and_score", diverge)
    params = parse_params({})
    study.optimize(lambda t: objective(t, params, None), n_trials=1)  # type: ignore[arg-type]
    assert study.trials[-1].state == TrialState.PRUNED and study.trials[-1].user_attrs["hparams"]

    def bug(*args: Any) -> float:
        raise ValueError("a real bug")

    monkeypatch.setattr(tuning, "_train_and_score", bug)
    with pytest.raises(ValueError, match="a real bug"):
        study.optimize(lambda t: objective(t, params, None), n_trials=1)  # type: ignore[arg-type]


# -- resume ------------------------------------------------------------------------------------------
def _quadratic(trial: optuna.Trial) -> float:
    hp = suggest_hparams(trial, SPACE)
    return -((math.log10(hp["learning_rate"]) + 3) ** 2) - (hp["n_epochs"] - 5) ** 2 / 10


SPACE: dict[str, dict[str, Any]] = {
    "learning_rate": {"low": 1e-5, "high": 1e-1, "log": True},
    "n_epochs": {"low": 1, "high": 10},
}


def test_interrupted_study_resumes_to_the_total(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    params = parse_params({"tune": {"storage": str(journal), "n_trials": 7, "space": SPACE}})
    calls = 0

    def interrupted(trial: optuna.Trial) -> float:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt  # Ctrl+C in the 4th trial
        return _quadratic(trial)

    with pytest.raises(KeyboardInterrupt):
        optimize_study(study_for(params, None, 0), interrupted, 7, progress=False)
    study = study_for(params, None, 0)  # a new process would re-open the journal the same way
    assert count_finished(study) == 3
    assert optimize_study(study, _quadratic, 7, progress=False) == 4
    again = study_for(params, None, 0)
    assert count_finished(again) == 7 and optimize_study(again, _quadratic, 7, progress=False) == 0
    # other settings (or other data) get a study of their own in the same journal, never mixed in
    other = parse_params({"tune": {"storage": str(journal), "space": {**SPACE, "n_epochs": {"low": 1, "high": 20}}}})
    fresh = study_for(other, None, 0)
    assert fresh.study_name != again.study_name and count_finished(fresh) == 0
    assert count_finished(study_for(params, None, 0)) == 7


def test_trial_of_a_dead_local_process_is_requeued(tmp_path: Path) -> None:
    params = parse_params({"tune": {"storage": str(tmp_path / "s.journal"), "n_trials": 4, "space": SPACE}})
    study = study_for(params, None, 0)
    optimize_study(study, _quadratic, 2, progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = study.ask()
    _quadratic(orphan)
    orphan.set_user_attr("worker", f"{__import__('socket').gethostname()}:{int(dead.stdout)}")
    alive = study.ask()
    alive.set_user_attr("worker", f"{__import__('socket').gethostname()}:1")  # pid 1 is alive
    assert reap_orphans(study_for(params, None, 0), max_retry=1) == [orphan.number]
    study = study_for(params, None, 0)
    assert optimize_study(study, _quadratic, 4, progress=False) == 2
    trials = study.trials
    assert trials[orphan.number].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == trials[orphan.number].params


def _complete(study: optuna.Study) -> list[tuple[dict[str, Any], float | None]]:
    return [(t.params, t.value) for t in study.trials if t.state == TrialState.COMPLETE]


@pytest.mark.parametrize("killed_at", [1, 3])
def test_a_study_killed_mid_trial_ends_with_the_same_trials(tmp_path: Path, killed_at: int) -> None:
    """Defect: after kill -9 in a trial, the resumed study re-ran it, then drew other trials than
    an uninterrupted study (the sampler keyed its draws on trial numbers, which the failed trial shifted)."""
    whole = parse_params({"tune": {"storage": str(tmp_path / "whole.journal"), "n_trials": 6, "space": SPACE}})
    uninterrupted = study_for(whole, None, 0)
    optimize_study(uninterrupted, _quadratic, 6, progress=False)

    params = parse_params({"tune": {"storage": str(tmp_path / "killed.journal"), "n_trials": 6, "space": SPACE}})
    study = study_for(params, None, 0)
    optimize_study(study, _quadratic, killed_at, progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = study.ask()  # the trial the killed process was running: sampled, never finished
    _quadratic(killed)
    killed.set_user_attr("worker", f"{__import__('socket').gethostname()}:{int(dead.stdout)}")
    resumed = study_for(params, None, 0)
    optimize_study(resumed, _quadratic, 6, progress=False, reap=True)
    assert _complete(resumed) == _complete(uninterrupted)
    assert resumed.best_params == uninterrupted.best_params


# -- best hyperparameters file -------------------------------------------------------------------
def test_load_best_hparams_roundtrip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "best.yaml"
    hp = {"learning_rate": 1.2e-4, "n_steps": 128, "gamma": 0.987}
    write_best_hparams(path, hp, ["best trial 3"])
    assert path.read_text().startswith("# best trial 3\n")
    assert load_best_hparams(path) == hp
    write_best_hparams(path, {}, ["no trial completed"])
    assert load_best_hparams(path) == {}
    with pytest.raises(InputError, match=r"dvc repro tune.*train\.hparams: params"):
        load_best_hparams(tmp_path / "missing.yaml")
    path.write_text("learning_rate: 1e-3\nlr: 0.1\n")
    with pytest.raises(InputError, match="unknown hyperparameter.*lr"):
        load_best_hparams(path)
    path.write_text("n_steps: 12.5\n")
    with pytest.raises(InputError, match="n_steps must be an integer"):
        load_best_hparams(path)


def test_make_storage_journal_and_sqlite(tmp_path: Path) -> None:
    journal = make_storage(str(tmp_path / "a" / "s.journal"))
    assert isinstance(journal, optuna.storages.JournalStorage)
    rdb = make_storage(f"sqlite:///{tmp_path}/b/s.db", heartbeat_interval=1, grace_period=2, max_retry=1)
    assert isinstance(rdb, optuna.storages.RDBStorage) and rdb.get_heartbeat_interval() == 1
    with pytest.raises(InputError, match="cannot open tune.storage postgresql://u:\\*\\*\\*@"):
        make_storage("postgresql://u:secret@127.0.0.1:1/db")


# -- one micro study end to end --------------------------------------------------------------------
def test_run_tune_micro_study(tmp_path: Path, tiny_map: MapData) -> None:
    xs, ys = [60.0, 70.0, 90.0, 100.0, 75.0, 95.0], [70.0, 95.0, 60.0, 100.0, 80.0, 85.0]
    targets = grid_targets(xs, ys, ["train"] * 4 + ["val"] * 2)
    scene = Scene.build(tiny_map, targets, 32)
    rt = Runtime(scene, pooled_memory(scene, 4, 16.0), 0.97)
    tune = {
        "n_trials": 2,
        "timesteps": 128,
        "n_envs": 4,
        "eval_episodes": 4,
        "n_evaluations": 2,
        "storage": str(tmp_path / "study.journal"),
        "space": {"learning_rate": {"low": 1e-4, "high": 1e-3, "log": True}, "n_steps": {"choices": [16, 32]}},
    }
    params = tiny_params(tune=tune, train={"n_envs": 4, "max_steps": 8, "batch_size": 32}, evaluate={"max_steps": 8})
    out = tmp_path / "tune"
    metrics = run_tune(params, rt, out, tmp_path / "best.yaml", tmp_path / "tune.json")
    assert metrics["n_complete"] + metrics["n_pruned"] == 2 and metrics["n_failed"] == 0
    assert (out / "trials.csv").exists() and (out / "tune.png").stat().st_size > 1000
    best = load_best_hparams(tmp_path / "best.yaml")
    assert set(best) == {"learning_rate", "n_steps"} and best == metrics["best_params"]
    assert run_tune(params, rt, out, tmp_path / "best.yaml", tmp_path / "tune.json")["n_trials"] == 2  # resumed: done


def test_tune_without_the_feature_cache_says_so(tmp_path: Path, tiny_map_path: Path) -> None:
    """Defect: tune without data/features quietly fell back to pooled features and another threshold."""
    grid_targets([60.0, 90.0], [60.0, 90.0], ["train", "test"]).to_csv(tmp_path / "targets.csv", index=False)
    params = tiny_params(tune={"storage": str(tmp_path / "s.journal")})
    with pytest.raises(InputError, match=r"calibration.json does not exist; run `dvc repro encode` first"):
        run_tune_stage(
            params,
            tiny_map_path,
            tmp_path / "targets.csv",
            tmp_path / "none",
            tmp_path / "out",
            tmp_path / "b.yaml",
            tmp_path / "m.json",
        )
    assert not (tmp_path / "b.yaml").exists() and not (tmp_path / "m.json").exists()
