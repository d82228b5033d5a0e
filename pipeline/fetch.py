"""DVC stage ``fetch``; the same as ``maprl fetch`` (see ``maprl fetch --help``)."""

from maprl.stages import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("fetch"))
