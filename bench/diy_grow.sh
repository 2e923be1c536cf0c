#!/bin/sh
# diy_grow.sh POOL DATA_FILE [STEP_MIB]: the do-it-yourself answer to a loopback thin pool that
# fills up, as an admin would write it from dmsetup(8) and losetup(8). bench/peers.py runs it
# beside a pool built with Docker 0.7's table (low water 32768 blocks).
#
# Level-triggered: read the event counter, then look; grow while free blocks are under the
# table's low-water mark; otherwise block in `dmsetup wait` until the counter moves.
# `dmsetup status` (without --noflush) commits the pool's metadata, as it does for anyone.
set -eu

pool=$1
data=$2
step_mib=${3:-1024}
loop=$(losetup -j "$data" | cut -d: -f1)

while :; do
    event=$(dmsetup info -c --noheadings -o events "$pool")
    # status: 0 <length> thin-pool <transaction> <meta used/total> <data used/total> ...
    set -- $(dmsetup status "$pool")
    used=${6%/*}
    total=${6#*/}
    # table: 0 <length> thin-pool <meta dev> <data dev> <block sectors> <low water> ...
    set -- $(dmsetup table "$pool")
    block=$6
    mark=$7
    if [ $((total - used)) -lt "$mark" ]; then
        truncate -s +"${step_mib}M" "$data"
        losetup -c "$loop"
        sectors=$(($(blockdev --getsz "$loop") / block * block))
        dmsetup table "$pool" | awk -v len="$sectors" '{ $2 = len; print }' | dmsetup reload "$pool"
        dmsetup resume "$pool"
        echo "$(date +%T.%N) grown to $sectors sectors"
        continue
    fi
    echo "waiting for event $event"
    dmsetup wait "$pool" "$event" >/dev/null
done
