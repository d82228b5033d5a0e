"""DVC stage ``tile``; the same as ``maprl tile`` (see ``maprl tile --help``)."""

from maprl.stages import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("tile"))
