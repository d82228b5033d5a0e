"""DVC stage ``encode``; the same as ``maprl encode`` (see ``maprl encode --help``)."""

from maprl.stages import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("encode"))
