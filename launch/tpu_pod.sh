#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh create|setup|run|status|logs|stop|delete [difflax.main flags ...]
#
#   export TPU=difflax-v5e ZONE=us-west4-a TYPE=v5litepod-16 PROJECT=my-project \
#          CONFIG=ddpm_cifar10:paper WORKDIR=gs://my-bucket/runs/ddpm \
#          DATA_DIR=gs://my-bucket/tensorflow_datasets
#   launch/tpu_pod.sh create && launch/tpu_pod.sh setup && launch/tpu_pod.sh run
#
# create  a Cloud TPU VM slice; VERSION defaults to the runtime of TYPE's generation. QUEUED=1
#         asks for it as a queued resource and waits until ACTIVE (exits 1 on FAILED/SUSPENDED);
#         SPOT=1 for spot capacity.
# setup   on every worker: python3-venv, a venv with a current pip, a clone of REPO (BRANCH) and
#         difflax with the jax[tpu] this repository pins.
# run     the same difflax.main command on every worker, detached (nohup) with --distributed=on,
#         one log per worker under LOGDIR; extra arguments go to difflax.main. Refuses to start
#         while difflax already runs there; otherwise clears a libtpu lock a crashed run left.
# status  the slice's state and, per worker, whether difflax runs and its last log line.
# logs    follows worker WORKER's log (default 0).
# stop    SIGTERM to difflax on every worker: like a preemption, all stop at one step and
#         checkpoint it; `run` again resumes from it.
# delete  deletes the slice (and its queued resource).
# DRY_RUN=1 prints every command instead of running it. LOGDIR is WORKDIR/logs for a local
# (shared) WORKDIR and ~/difflax_logs/<run> on each worker for a bucket. The workdir and TFDS
# data must be in a bucket the slice's service account can read and write.
set -euo pipefail
action=${1:-}; shift || true
case "$action" in create|setup|run|status|logs|stop|delete) ;;
  *) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
: "${TPU:?set TPU (the slice name)}" "${ZONE:?set ZONE}"
TYPE=${TYPE:-v4-8}
case "$TYPE" in  # Runtime versions: cloud.google.com/tpu/docs/runtimes
  v5litepod-*|v5e-*) default_version=v2-alpha-tpuv5-lite ;;
  v5p-*) default_version=v2-alpha-tpuv5 ;;
  v6e-*) default_version=v2-alpha-tpuv6e ;;
  *) default_version=tpu-ubuntu2204-base ;;  # v2, v3, v4
esac
VERSION=${VERSION:-$default_version}
REPO=${REPO:-https://github.com/difflax/difflax}; BRANCH=${BRANCH:-main}
here=$(cd "$(dirname "$0")/.." && pwd)
jax_pin=$(grep -o 'jax\[tpu\]==[0-9.]*' "$here/pyproject.toml" | head -n 1)
project=(); [ -n "${PROJECT:-}" ] && project=(--project "$PROJECT")
spot=(); [ "${SPOT:-0}" = 1 ] && spot=(--spot)
# The python process `run` starts, not the remote shell whose command line names it too.
proc="'^[.]venv/bin/python -m difflax[.]main'"

# Runs (or with DRY_RUN=1 prints, one command per line, arguments with spaces single-quoted).
x() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    local a out=()
    for a in "$@"; do
      if [[ $a =~ [[:space:]\'\"\$\;\&\|\<\>\*\(\)] ]]; then out+=("'${a//\'/\'\\\'\'}'"); else out+=("$a"); fi
    done
    echo "${out[*]}"
  else
    "$@"
  fi
}
ssh_tpu() {  # ssh_tpu WORKER COMMAND
  x gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${project[@]}" --worker="$1" \
    --command "$2"
}
logdir() {
  if [ -n "${LOGDIR:-}" ]; then echo "$LOGDIR"
  elif [[ ${WORKDIR:-} == *://* ]]; then echo "\$HOME/difflax_logs/$(basename "$WORKDIR")"
  else echo "${WORKDIR:?set WORKDIR}/logs"; fi
}

case "$action" in
  create)
    if [ "${QUEUED:-0}" = 1 ]; then
      x gcloud compute tpus queued-resources create "$TPU" --node-id "$TPU" --zone "$ZONE" \
        "${project[@]}" --accelerator-type "$TYPE" --runtime-version "$VERSION" "${spot[@]}"
      describe=(gcloud compute tpus queued-resources describe "$TPU" --zone "$ZONE"
                "${project[@]}" --format='value(state.state)')
      if [ "${DRY_RUN:-0}" = 1 ]; then x "${describe[@]}"; exit 0; fi
      while true; do
        state=$("${describe[@]}")
        case "$state" in
          ACTIVE) break ;;
          FAILED|SUSPENDED) echo "queued resource $TPU is $state; see" \
              "'gcloud compute tpus queued-resources describe $TPU --zone $ZONE'" >&2; exit 1 ;;
        esac
        echo "queued resource $TPU: $state; waiting" >&2; sleep 30
      done
    else
      x gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" "${project[@]}" \
        --accelerator-type "$TYPE" --version "$VERSION" "${spot[@]}"
    fi ;;
  setup)
    ssh_tpu all "set -e; sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv git
      [ -d difflax ] || git clone --branch $BRANCH $REPO difflax
      cd difflax && git fetch -q && git checkout -q $BRANCH && git pull -q --ff-only
      [ -d .venv ] || python3 -m venv .venv
      .venv/bin/pip install -q --upgrade pip
      .venv/bin/pip install -q -e '.[tfds,gcs]' '$jax_pin'" ;;
  run)
    : "${CONFIG:?set CONFIG, e.g. ddpm_cifar10:paper}" "${WORKDIR:?set WORKDIR (gs://...)}"
    extra=(); [ -n "${DATA_DIR:-}" ] && extra=("--config.data.data_dir=$DATA_DIR")
    args=$(printf ' %q' --config="$CONFIG" --workdir="$WORKDIR" --distributed=on \
      "${extra[@]}" "$@")
    log=$(logdir)
    ssh_tpu all "set -e; if pgrep -f $proc >/dev/null; then
        echo \"difflax already runs on \$(hostname); 'launch/tpu_pod.sh stop' first\" >&2; exit 1; fi
      sudo rm -f /tmp/libtpu_lockfile; mkdir -p $log; cd difflax
      nohup .venv/bin/python -m difflax.main$args > $log/\$(hostname).log 2>&1 < /dev/null &
      echo \"started on \$(hostname): $log/\$(hostname).log\""
    echo "follow worker 0: launch/tpu_pod.sh logs (WORKER=n for another); state: launch/tpu_pod.sh status" ;;
  status)
    x gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" "${project[@]}" \
      --format='value(state,health,acceleratorType)'
    log=$(logdir)
    ssh_tpu all "echo \"\$(hostname): \$(pgrep -f $proc >/dev/null && echo running || echo stopped);\" \
      \"\$(tail -n 1 $log/\$(hostname).log 2>/dev/null)\"" ;;
  logs)
    log=$(logdir)
    ssh_tpu "${WORKER:-0}" "tail -n 100 -F $log/\$(hostname).log" ;;
  stop)
    ssh_tpu all "pkill -TERM -f $proc && echo \"\$(hostname): SIGTERM sent\" || echo \"\$(hostname): not running\"" ;;
  delete)
    if [ "${QUEUED:-0}" = 1 ]; then
      x gcloud compute tpus queued-resources delete "$TPU" --zone "$ZONE" "${project[@]}" \
        --force --quiet
    else
      x gcloud compute tpus tpu-vm delete "$TPU" --zone "$ZONE" "${project[@]}" --quiet
    fi ;;
esac
