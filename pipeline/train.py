"""DVC stage ``train``; the same as ``maprl train`` (see ``maprl train --help``)."""

from maprl.stages import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("train"))
