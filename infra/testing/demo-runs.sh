#!/usr/bin/env bash
# `make demo` from a fresh clone, N times, each on a fresh workspace with its own training seed:
# how many deployed, how many were refused for fairness (a legitimate outcome, said as such), how many
# failed. Each run works in a fresh copy of a commit (HEAD by default: what a clone gets) under a
# temporary folder, so the repository's own dvc.lock and reports are not touched and uncommitted
# edits do not leak in; the copies are removed afterwards.
#
#   bash infra/testing/demo-runs.sh [N=10] [REV=HEAD]
set -uo pipefail
cd "$(dirname "$0")/../.."
N=${1:-10}
REV=${2:-HEAD}
REPO=$(pwd)
PY=$REPO/.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
deployed=0 fairness=0 failed=0
for i in $(seq 1 "$N"); do
  d=$work/run$i
  mkdir -p "$d"
  git archive "$REV" | tar -x -C "$d"
  (cd "$d" && git init -q && git add -A && git -c user.email=ci@example.org -c user.name=ci commit -qm copy)
  "$PY" - "$d/params.yaml" "$i" <<'PY'
import sys, yaml
path, seed = sys.argv[1], int(sys.argv[2])
p = yaml.safe_load(open(path))
p["train"]["seed"] = seed
yaml.safe_dump(p, open(path, "w"), sort_keys=False)
PY
  log=$d/demo.log
  start=$(date +%s)
  # PYTHONPATH: every process of the run (the stages dvc starts too) imports the copy's code, not the checkout's
  (cd "$d" && PATH="$REPO/.venv/bin:$PATH" PYTHONPATH="$d" "$PY" -m lakewarden.demo >"$log" 2>&1)
  rc=$?
  secs=$(( $(date +%s) - start ))
  flat=$(tr -s ' \n' ' ' < "$log")
  if [ $rc -ne 0 ]; then
    failed=$((failed + 1)); what="FAILED (exit $rc): $(grep -a -E 'demo failed|error:' "$log" | tail -1)"
  elif echo "$flat" | grep -q "demo finished (not deployed: fairness failed"; then
    fairness=$((fairness + 1)); what="$(echo "$flat" | grep -o 'not deployed: fairness failed (rule [^)]*)' | tail -1)"
  elif echo "$flat" | grep -q "demo finished (deployed credit@"; then
    deployed=$((deployed + 1)); what="deployed"
  else
    failed=$((failed + 1)); what="exit 0 but neither deployed nor refused: see $log"
  fi
  grep -q "Traceback" "$log" && what="$what; a traceback was printed"
  echo "run $i (train.seed=$i): $what, ${secs}s"
done
echo "deployed $deployed / $N, not deployed for fairness $fairness, failed $failed"
[ "$failed" -eq 0 ]
