#!/usr/bin/env bash
# `make test`: the suite as two pytest processes side by side, then each one's output in turn.
#   the big one          much of it waits on servers and load windows, so a 2-core machine has room for a second
#   openvino or side     tests that run OpenVINO in-process (inside the big process, its next Triton start-up once
#                        crashed the interpreter after ~230 tests; never reproduced alone), and long end-to-end tests
#                        marked `side` so that the two take similar times
# A third process was tried: each process's share of the cores shrank more than its work, and the suite got slower.
# Each process runs torch with one OpenMP thread (tests/conftest.py says why).
set -u
python=$1
shift
selections=("not openvino and not side" "openvino or side")
logs=() pids=()
for selection in "${selections[@]}"; do
  log=$(mktemp)
  logs+=("$log")
  "$python" -m pytest -q -p no:cacheprovider --durations=10 -m "$selection" "$@" >"$log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!selections[@]}"; do
  wait "${pids[$i]}" || failed=1
  echo "== pytest -m \"${selections[$i]}\" =="
  cat "${logs[$i]}"
  rm -f "${logs[$i]}"
done
exit $failed
