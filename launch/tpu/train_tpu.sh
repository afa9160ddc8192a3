#!/bin/bash
# Multi-host TPU VM training: runs the same command on every worker of a TPU VM slice;
# jax.distributed detects the TPU topology and the coordinator itself.
#
#   launch/tpu/train_tpu.sh TPU_NAME ZONE experiments/ft_8b.py gs://BUCKET/runs/ft_8b \
#       --config.data.path=/mnt/data/corpus [--config.x=y ...]
#
# WORKDIR may be a gs:// URL (the workers' service account needs read/write on the bucket) or a
# path every worker mounts; the config's data.path must be a path on every worker.
#
# The repository must be at ~/ftjax on every worker with requirements installed (Python >= 3.12:
# pip install -r requirements.txt "jax[tpu]==0.12.0.1"; not yet run on a TPU). Check the fit
# first with python -m launch.dryrun --config=... --num_devices=<chips>.
set -euo pipefail
TPU_NAME=${1:?usage: train_tpu.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]}
ZONE=${2:?}
CONFIG=${3:?}
WORKDIR=${4:?}
shift 4
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="
  cd ~/ftjax && python -m launch.train --config=${CONFIG} --workdir=${WORKDIR} --multiprocess $*"
