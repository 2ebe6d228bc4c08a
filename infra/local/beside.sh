#!/usr/bin/env bash
# beside.sh 'BACKGROUND COMMAND' FOREGROUND COMMAND...
# Runs the first command (one string, run by bash) in the background with its output kept
# aside, and the rest in the foreground; then prints the background command's output in one
# piece and fails if either failed. `make test` runs the cluster contract tests beside the
# single-node suite this way (the Makefile is .NOTPARALLEL: its steps depend on each other).
set -uo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: beside.sh 'BACKGROUND COMMAND' FOREGROUND COMMAND..." >&2
  exit 2
fi
background="$1"
shift
log="$(mktemp "${TMPDIR:-/tmp}/beside.XXXXXX")"
trap 'rm -f "$log"' EXIT

bash -c "$background" >"$log" 2>&1 &
pid=$!
rc=0
"$@" || rc=$?
brc=0
wait "$pid" || brc=$?
printf '\n===== beside: %s (exit %s)\n' "$background" "$brc"
cat "$log"
if [[ $rc -ne 0 ]]; then exit "$rc"; fi
exit "$brc"
