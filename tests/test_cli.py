import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maprl.cli import build_parser, main, stage_command
from maprl.config import AGENTS
from maprl.errors import InputError
from maprl.stage import guard

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("fetch", "tile", "check-params"):
        assert cmd in out
    for name, action in build_parser()._subparsers._group_actions[0].choices.items():  # type: ignore[union-attr]
        assert action.description, f"{name} has no description"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("base: {seed: 1}\ntile: {test_fraction: 2}\n", "tile.test_fraction"),
        ("base: {seed: 1}\ntile: {modes: random}\n", "tile.modes"),
        ("base: {seed: 1}\ntile: {view_size: .nan}\n", "tile.view_size"),
        ("base: {seed: 1}\ntile: {test_fraction: .inf}\n", "tile.test_fraction"),
        ("fetch: [1, 2\n", "not valid YAML"),
        ("", "no base, tile section(s)"),
        ("base: {seed: 1}\n", "no tile section"),
    ],
)
def test_stage_bad_params_exit_2_and_keep_outputs(tmp_path: Path, text: str, needle: str) -> None:
    out = tmp_path / "targets"
    out.mkdir()
    (out / "targets.csv").write_text("earlier")
    metrics = tmp_path / "tile.json"
    metrics.write_text("{}")
    params = _write(tmp_path, text)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "pipeline" / "tile.py"),
            "--params",
            str(params),
            "--out",
            str(out),
            "--metrics",
            str(metrics),
            "--map",
            str(tmp_path / "map.tif"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "targets.csv").read_text() == "earlier" and metrics.read_text() == "{}"


def _tile(tmp_path: Path, params: Path, map_path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "pipeline" / "tile.py"), "--params", str(params), "--map", str(map_path)]
    cmd += ["--out", str(tmp_path / "targets"), "--metrics", str(tmp_path / "tile.json")]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)


def test_missing_map_is_clear(tmp_path: Path) -> None:
    params = _write(tmp_path, "base: {seed: 1}\ntile: {view_size: 16, block_size: 32}\n")
    proc = _tile(tmp_path, params, tmp_path / "none.tif")
    assert proc.returncode == 2 and "dvc repro fetch" in proc.stderr and "Traceback" not in proc.stderr


def test_stage_command_comes_from_dvc_yaml() -> None:
    cmd = stage_command("train", REPO / "dvc.yaml", agent="original")
    assert cmd[:2] == ["python", "pipeline/train.py"] and "models/original/policy.zip" in cmd
    assert cmd[cmd.index("--agents") + 1] == "original" and not any("{agent}" in arg for arg in cmd)
    every = stage_command("train", REPO / "dvc.yaml")  # maprl train: all five, each path filled in per agent
    assert sorted(every[every.index("--agents") + 1].split(",")) == sorted(AGENTS)
    assert "models/{agent}/policy.zip" in every
    with pytest.raises(InputError, match="no stage 'nope'"):
        stage_command("nope", REPO / "dvc.yaml")


def test_check_params_into_a_closed_pipe_is_quiet() -> None:
    """Defect: ``maprl check-params | head -1`` ended in a BrokenPipeError traceback."""
    proc = subprocess.run(
        f"{sys.executable} -m maprl.cli check-params | head -1", shell=True, capture_output=True, text=True, cwd=REPO
    )
    assert proc.stdout.strip() == "{" and "Traceback" not in proc.stderr and "Error" not in proc.stderr


def test_check_params_prints_resolved(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = _write(tmp_path, "base: {seed: 5}\n")
    assert main(["check-params", "--params", str(params)]) == 0
    assert '"seed": 5' in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["encode", "train", "evaluate"])
def test_bad_params_in_any_stage_script_is_a_message(tmp_path: Path, stage: str) -> None:
    """Params are loaded under the error guard in every stage script, not only some."""
    params = _write(tmp_path, "base: {seed: .nan}\n")
    flags = {"encode": ["--map", "m", "--targets", "t", "--out", "o", "--metrics", "x"]}
    flags["train"] = ["--agents", "memory", "--map", "m", "--targets", "t", "--features", "f", "--best", "b"]
    flags["train"] += ["--policy", "p", "--checkpoints", "c", "--history", "h", "--live", "l", "--metrics", "x"]
    flags["train"] += ["--worlds", "w"]
    flags["evaluate"] = ["--map", "m", "--targets", "t", "--features", "f", "--policies", "memory=p"]
    flags["evaluate"] += ["--out", "o", "--metrics", "x", "--locate-metrics", "y"]
    cmd = [sys.executable, str(REPO / "pipeline" / f"{stage}.py"), "--params", str(params), *flags[stage]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no" in proc.stderr and "section" in proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_stage_stops_when_its_parent_is_killed(tmp_path: Path) -> None:
    """Defect: kill -9 of `dvc repro` left the stage running as an orphan that kept writing outputs."""
    (tmp_path / "params.yaml").write_text("base: {seed: 1}\nfetch: {size: 6144}\ntile: {view_size: 224}\n")
    stage = [sys.executable, str(REPO / "pipeline" / "fetch.py"), "--params", str(tmp_path / "params.yaml")]
    stage += ["--out", str(tmp_path / "map"), "--metrics", str(tmp_path / "fetch.json")]
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, time; p = subprocess.Popen({stage!r}); print(p.pid, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    time.sleep(8)  # the stage is rendering the world by now
    parent.kill()
    parent.wait()
    for _ in range(100):
        if not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the stage went on running after its parent was killed")
    assert not (tmp_path / "map").exists() and not (tmp_path / "fetch.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_ctrl_c_says_what_is_true_about_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    """Defect: after Ctrl-C under dvc repro the message said outputs were left as they were; DVC had removed them."""

    def interrupted() -> None:
        raise KeyboardInterrupt

    assert guard(interrupted) == 130
    assert "dvc checkout" in capsys.readouterr().err
