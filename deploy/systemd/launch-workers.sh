#!/usr/bin/env bash
# Enables and starts one farm-worker@<index> unit per GPU that nvidia-smi lists, and disables the
# instances of GPUs that are gone. Run as root after installing the unit files and /etc/farm/worker.env.
#   deploy/systemd/launch-workers.sh            # enable and start
#   deploy/systemd/launch-workers.sh --dry-run  # only print what it would do
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
fi
run() {
    echo "+ $*"
    if [[ $dry_run -eq 0 ]]; then
        "$@"
    fi
}

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "launch-workers: nvidia-smi not found (is the NVIDIA driver installed?)" >&2
    exit 1
fi
if [[ ! -r /etc/farm/worker.env ]]; then
    echo "launch-workers: /etc/farm/worker.env is missing (see farm-worker@.service)" >&2
    exit 1
fi

mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader,nounits | tr -d ' ')
if [[ ${#gpus[@]} -eq 0 ]]; then
    echo "launch-workers: nvidia-smi lists no GPU" >&2
    exit 1
fi
echo "launch-workers: GPUs ${gpus[*]}"

run systemctl daemon-reload
for index in "${gpus[@]}"; do
    run systemctl enable --now "farm-worker@${index}.service"
done

# Instances for GPUs that no longer exist: stop them (they drain) and disable them.
while read -r unit _; do
    index="${unit#farm-worker@}"
    index="${index%.service}"
    keep=0
    for g in "${gpus[@]}"; do
        [[ "$g" == "$index" ]] && keep=1
    done
    if [[ $keep -eq 0 ]]; then
        run systemctl disable --now "$unit"
    fi
done < <(systemctl list-units --all --plain --no-legend 'farm-worker@*.service' 2>/dev/null || true)
