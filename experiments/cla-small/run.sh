#!/usr/bin/env bash
# The whole small-scale CLA experiment on one machine: prepare the data, train the grid as
# parallel processes, write the report and pack the two chosen models.
#   experiments/cla-small/run.sh OUT_DIR [more arguments of `python3 -m cla_train.experiments all`]
# CORPUS (default shared/data/corpus) and WORK (default /tmp/cla-work) may be set in the environment.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:?usage: experiments/cla-small/run.sh OUT_DIR [extra arguments]}"
shift
cd "$root"
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 -m cla_train.experiments all --corpus "${CORPUS:-shared/data/corpus}" \
    --work "${WORK:-/tmp/cla-work}" --out "$out" "$@"
