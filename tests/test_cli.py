import subprocess
import sys
from pathlib import Path

import pytest

from maprl.cli import build_parser, main

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
        ("tile: {test_fraction: 2}\n", "tile.test_fraction"),
        ("tile: {modes: random}\n", "tile.modes"),
        ("fetch: [1, 2\n", "not valid YAML"),
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


def test_missing_map_is_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = _write(tmp_path, "tile: {view_size: 16, block_size: 32}\n")
    code = main(["tile", "--params", str(params), "--map", str(tmp_path / "none.tif"), "--out", str(tmp_path)])
    assert code == 2 and "dvc repro fetch" in capsys.readouterr().err


def test_check_params_prints_resolved(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = _write(tmp_path, "base: {seed: 5}\n")
    assert main(["check-params", "--params", str(params)]) == 0
    assert '"seed": 5' in capsys.readouterr().out
