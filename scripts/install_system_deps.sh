#!/usr/bin/env bash
# Debian packages the project needs: the embedded dataset's photo assets (tuxpaint stamps, MATE
# backgrounds), Fashion-MNIST for the supervised baseline, and slurm-wlm for the private-cluster test. Installs them when run as root; otherwise
# prints the command to run.
set -euo pipefail
packages=(tuxpaint-stamps-default mate-backgrounds dataset-fashion-mnist slurm-wlm)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]}" >&2
  echo "install them as root: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}"; }
