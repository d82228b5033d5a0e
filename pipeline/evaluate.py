"""DVC stage ``evaluate``; the same as ``maprl evaluate`` (see ``maprl evaluate --help``)."""

from maprl.stages import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("evaluate"))
