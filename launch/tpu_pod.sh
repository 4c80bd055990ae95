#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh create|setup|run|delete  (settings from the environment below)
#
#   TPU=difflax-v4-32 ZONE=us-central2-b TYPE=v4-32 VERSION=tpu-ubuntu2204-base \
#   REPO=https://github.com/difflax/difflax CONFIG=iddpm_cifar10:paper \
#   WORKDIR=gs://my-bucket/runs/iddpm DATA_DIR=gs://my-bucket/tensorflow_datasets \
#     launch/tpu_pod.sh create && launch/tpu_pod.sh setup && launch/tpu_pod.sh run
#
# create: a Cloud TPU VM slice (QUEUED=1 asks for it as a queued resource and waits until it is
#   active; SPOT=1 for a spot / preemptible slice).
# setup: on every worker, clones REPO (BRANCH, default main) and installs difflax with jax[tpu].
# run: the same difflax.main command on every worker (`--worker=all`); JAX detects the pod, so no
#   coordinator flags are needed. Extra arguments go to difflax.main. The run resumes from
#   WORKDIR's latest checkpoint, so after a preemption `run` again (or `delete` and `create`).
# delete: deletes the slice (and its queued resource).
# The workdir and TFDS data must be in a bucket the slice's service account can read and write.
set -euo pipefail
: "${TPU:?set TPU (the slice name)}" "${ZONE:?set ZONE}"
action=${1:?create|setup|run|delete}; shift || true
TYPE=${TYPE:-v4-8}; VERSION=${VERSION:-tpu-ubuntu2204-base}
REPO=${REPO:-https://github.com/difflax/difflax}; BRANCH=${BRANCH:-main}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }
case "$action" in
  create)
    if [ "${QUEUED:-0}" = 1 ]; then
      gcloud compute tpus queued-resources create "$TPU" --node-id "$TPU" --zone "$ZONE" \
        --accelerator-type "$TYPE" --runtime-version "$VERSION" ${SPOT:+--spot}
      until gcloud compute tpus queued-resources describe "$TPU" --zone "$ZONE" \
          --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done
    else
      gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type "$TYPE" \
        --version "$VERSION" ${SPOT:+--spot}
    fi ;;
  setup)
    ssh_all "set -e; [ -d difflax ] || git clone --branch $BRANCH $REPO difflax; cd difflax &&
      git pull --ff-only && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu,tfds,gcs]'" ;;
  run)
    : "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR (gs://...)}"
    extra=${DATA_DIR:+--config.data.data_dir=$DATA_DIR}
    ssh_all "cd difflax && .venv/bin/python -m difflax.main --config=$CONFIG \
      --workdir=$WORKDIR $extra $*" ;;
  delete)
    if [ "${QUEUED:-0}" = 1 ]; then
      gcloud compute tpus queued-resources delete "$TPU" --zone "$ZONE" --force --quiet
    else
      gcloud compute tpus tpu-vm delete "$TPU" --zone "$ZONE" --quiet
    fi ;;
  *) echo "unknown action $action: create|setup|run|delete" >&2; exit 2 ;;
esac
