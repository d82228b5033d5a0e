"""End to end: ``dvc repro`` on tiny params in a temporary copy of the repository."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from PIL import Image
from rasterio.transform import from_origin

from conftest import textured_rgb
from workspace import TINY, copy_repo, git_commit_all

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _lock_outs(repo: Path) -> dict[str, str]:
    """Every output's hash in dvc.lock, except timings and the logs that carry wall-clock times by design
    (the study journal, dvclive's step timestamps) and the emptied checkpoint folders."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    logs = ("metrics/timing/", "data/tune", "dvclive/")
    return {
        o["path"]: o.get("md5", "")
        for stage in lock["stages"].values()
        for o in stage.get("outs", [])
        if not o["path"].startswith(logs) and not o["path"].endswith("/checkpoints")
    }


@pytest.mark.e2e
def test_dvc_repro_on_tiny_params(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo(repo, TINY)
    git_commit_all(repo)

    _run(["dvc", "repro"], repo)
    assert (repo / "data" / "map" / "map.tif").exists()
    tile = json.loads((repo / "metrics" / "tile.json").read_text())
    assert tile["n_test"] + tile["n_train"] == 24
    ev = json.loads((repo / "metrics" / "eval.json").read_text())
    assert set(ev["agent"]) == {"train", "test", "test_decoy", "test_autumn"}
    assert {"retrieve_then_search", "agent_randomized", "agent_search"} <= set(ev["baselines"])
    rob = json.loads((repo / "metrics" / "robustness.json").read_text())
    cells = {f"{k}@{s:g}" for k in TINY["robustness"]["kinds"] for s in TINY["robustness"]["strengths"]}
    methods = {"agent", "agent_randomized", "retrieve_then_fly", "retrieve_then_search", "template_oracle"}
    for domain in ("same", "autumn"):
        assert set(rob["cells"][domain]) == cells | {"none"}
        assert all(set(c) == methods for c in rob["cells"][domain].values())
    assert set(rob["dynamics"]) == {"action_scale@1", "action_scale@0.5", "action_noise@0.1"}
    assert (repo / "data" / "robustness" / "curves" / "autumn_rotation.csv").exists()
    assert (repo / "data" / "eval" / "episode.gif").exists() and (repo / "models" / "best_hparams.yaml").exists()
    assert json.loads((repo / "metrics" / "tune.json").read_text())["n_trials"] >= 2
    loc = json.loads((repo / "metrics" / "locate.json").read_text())
    assert set(loc["methods"]) == {"agent", "retrieve_then_fly"} and loc["fit_split"] == "val"
    assert {"ece", "precision_confidence_ge_0.9", "abstention_rate"} <= set(loc["methods"]["agent"]["test"])

    # maprl locate with the trained agent: the policy's fingerprint matches this map and features
    with rasterio.open(repo / "data" / "map" / "map.tif") as src:
        crop = np.moveaxis(src.read((1, 2, 3), window=((60, 92), (70, 102))), 0, -1).astype(np.uint8)
    Image.fromarray(crop).save(tmp_path / "crop.png")
    shown = _run(["maprl", "locate", str(tmp_path / "crop.png"), "--geojson", str(tmp_path / "c.geojson")], repo)
    answer, _ = json.JSONDecoder().raw_decode(shown[shown.index("{") :])
    assert answer["method"] == "agent" and 0 <= answer["confidence"] <= 1
    assert json.loads((tmp_path / "c.geojson").read_text())["type"] == "FeatureCollection"

    again = _run(["dvc", "repro"], repo)
    assert "Running stage" not in again

    # every stage again: byte-identical metrics and artifacts (dvc.lock's hashes do not move), timings aside
    metrics = {p.name: p.read_bytes() for p in (repo / "metrics").glob("*.json")}
    lock = _lock_outs(repo)
    forced = _run(["dvc", "repro", "-f"], repo)
    assert "Running stage 'encode'" in forced and "Running stage 'train'" in forced
    assert {p.name: p.read_bytes() for p in (repo / "metrics").glob("*.json")} == metrics
    assert _lock_outs(repo) == lock
    assert (repo / "metrics" / "timing" / "train-memory.json").exists()

    # the agents, evaluate parts, robustness cells and grid seeds ran in 2 processes; in one, every byte is the same
    one = ["-S", "train.workers=1", "-S", "evaluate.workers=1", "-S", "robustness.workers=1", "-S", "grid.workers=1"]
    exp = _run(["dvc", "exp", "run", *one], repo)
    assert "Running stage 'train'" in exp and "Running stage 'robustness'" in exp and "Running stage 'tune'" not in exp
    assert "Running stage 'evaluate'" in exp
    assert {p.name: p.read_bytes() for p in (repo / "metrics").glob("*.json")} == metrics
    assert _lock_outs(repo) == lock

    exp = _run(["dvc", "exp", "run", "-S", "evaluate.episodes=6"], repo)
    assert "Running stage 'evaluate'" in exp and "Running stage 'fetch'" not in exp
    assert "Running stage 'train" not in exp

    exp = _run(["dvc", "exp", "run", "-S", "tile.test_fraction=0.3"], repo)
    assert "Running stage 'tile'" in exp and "Running stage 'fetch'" not in exp

    # a new map right after a default run: tune starts a study of its own (its name hashes the data)
    photo = tmp_path / "photo.tif"
    rgb = textured_rgb(224, seed=5)
    profile = {"driver": "GTiff", "width": 224, "height": 224, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32632", "transform": from_origin(500000, 5150000, 1.0, 1.0)}  # fmt: skip
    with rasterio.open(photo, "w", **profile) as dst:
        dst.write(np.moveaxis(rgb, -1, 0))
    # the default synthetic autumn domain is skipped for a file map (fetch says so)
    exp = _run(["dvc", "exp", "run", "-S", "fetch.source=file", "-S", f"fetch.path={photo}"], repo)
    assert "Running stage 'tune'" in exp and "Running stage 'evaluate'" in exp
    ev = json.loads((repo / "metrics" / "eval.json").read_text())
    assert {"agent_nomemory", "agent_original"} <= set(ev["baselines"])
