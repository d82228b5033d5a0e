"""DVC stage ``tune``; the same as ``maprl tune`` (see ``maprl tune --help``)."""

from maprl.stages import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("tune"))
