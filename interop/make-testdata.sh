#!/bin/sh
# Regenerate testdata/bugout-vectors.json and testdata/tracker-samples.json from
# the real JS code (npm bugout 0.0.13 and friends, installed by
# `npm ci --prefix interop`). Root only: the generators run in a network
# namespace of their own (`unshare -n`) whose one interface is loopback, with
# IPv6 off so that libwebrtc lists the same candidates on every machine.
#
#   interop/make-testdata.sh [OUT_DIR]     (default: testdata/ of this checkout)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:-$here/../testdata}" && cd "${1:-$here/../testdata}" && pwd)
exec unshare -n sh -c '
  ip link set lo up
  v6=/proc/sys/net/ipv6/conf/lo/disable_ipv6
  if [ -e $v6 ]; then echo 1 > $v6; fi
  node "$1/make-bugout-vectors.js" "$2" && node "$1/make-tracker-samples.js" "$2"
' sh "$here" "$out"
