#!/usr/bin/env bash
# Usage: launch/local.sh N CONFIG WORKDIR [difflax.main flags ...]
#
# Runs N processes of `python -m difflax.main` on this machine as one multi-process JAX job:
# process 0 coordinates on a free port of 127.0.0.1, every process gets DEVICES_PER_PROCESS
# (default 4) CPU devices (added to any XLA_FLAGS you set) and gloo collectives. This is how
# every multi-host code path is tested on one machine, and how you try a pod configuration on a
# laptop, e.g.
#
#   launch/local.sh 2 cascade_32_64:tiny runs/x --config.mesh.fsdp=2
#
# Each process logs to WORKDIR/logs/process_<i>.log (process 0 also to this terminal). SIGTERM or
# Ctrl-C is passed to every process (they checkpoint and stop); the exit status is the first
# non-zero one of the processes. PYTHON defaults to .venv/bin/python when it exists.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
n=$1; config=$2; workdir=$3; shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)}
devices=${DEVICES_PER_PROCESS:-4}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$workdir/logs"
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
for ((i = 0; i < n; i++)); do
  env JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    "$python" -m difflax.main --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" "$@" \
    > "$workdir/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$workdir/logs/process_0.log" --pid="${pids[0]}" &
status=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid" && rc=0 || rc=$?
    # A trapped signal interrupts `wait` (status > 128) while the process still runs.
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [ "$status" -eq 0 ] && [ "$rc" -ne 0 ]; then status=$rc; fi
done
exit "$status"
