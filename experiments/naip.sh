#!/usr/bin/env bash
# The NAIP cross-date experiment: the map is real NAIP aerial imagery of a North Dakota tile from
# 2020-08-31; the photos are cut from the same tile on 2014-07-20, 2016-08-16 and 2018-07-16
# (co-registered, 5 m; see ../shared/data/README.md). Every stage runs as a DVC experiment:
#
#   bash experiments/naip.sh                  # queue it, run it, then: dvc exp show / maprl report --rev naip
#   bash experiments/naip.sh -S base.seed=1   # extra -S overrides are passed on
#
# View 128 px (640 m) with the success radius at a quarter of it (32 px = 160 m); spatial blocks of
# 192 px; the robustness stage runs one perturbation (any rotation) to keep the run short.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
naip=${NAIP_DIR:-$(cd "$repo/../shared/data/naip-nd" && pwd)}
for f in naip_20200831 naip_20180716 naip_20160816 naip_20140720; do
  [[ -f "$naip/$f.tif" ]] || { echo "missing $naip/$f.tif: set NAIP_DIR to the naip-nd folder" >&2; exit 1; }
done
query() { echo "{name: $1, source: file, path: $naip/$2.tif}"; }
cd "$repo"
dvc exp run --queue -n "${NAIP_NAME:-naip}" \
  -S fetch.source=file -S "fetch.path=$naip/naip_20200831.tif" \
  -S "fetch.queries=[$(query d2018 naip_20180716), $(query d2016 naip_20160816), $(query d2014 naip_20140720)]" \
  -S tile.view_size=128 -S tile.block_size=192 -S evaluate.success_radius=32 \
  -S encoder.cache_stride=8 \
  -S "robustness.kinds=[rotation]" -S "robustness.strengths=[1.0]" \
  "$@"
dvc queue start -j 1
echo "queued; follow with: dvc queue status / dvc queue logs ${NAIP_NAME:-naip}"
