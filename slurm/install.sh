#!/usr/bin/env bash
# Install the Debian packages for the development SLURM cluster (slurm/start.sh).
# Safe to run repeatedly: does nothing when everything is already installed.
# Needs root (or sudo) and a Debian/Ubuntu machine; no init system is used.
set -euo pipefail

# iproute2: the bridge, veth pairs and network namespaces of the two-node cluster.
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2)

t0=${EPOCHREALTIME/./}
step() {
    local us=$(( ${EPOCHREALTIME/./} - t0 ))
    printf '[install %3d.%01ds] %s\n' $((us / 1000000)) $((us % 1000000 / 100000)) "$*"
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    step "all packages installed: ${PACKAGES[*]}"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# Package scripts must not try to start services: there is no init system here.
policy=/usr/sbin/policy-rc.d
policy_backup=""
if [ -e "$policy" ]; then
    policy_backup=$(mktemp)
    $SUDO cp -p "$policy" "$policy_backup"
fi
restore_policy() {
    if [ -n "$policy_backup" ]; then
        $SUDO cp -p "$policy_backup" "$policy"
        rm -f "$policy_backup"
    else
        $SUDO rm -f "$policy"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
$SUDO chmod 755 "$policy"

step "apt-get update"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
step "apt-get install ${missing[*]}"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
step "installed: ${missing[*]}"
