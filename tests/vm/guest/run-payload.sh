#!/bin/sh
# Run the payload command inside the guest's root (both modes) and hand its results back.
#
# /vmbed/payload.env (written by the host) exports the environment, cds to the checkout and sets
# "$@" to the command. Its stdout and stderr go to the virtio ports the host streams from; the
# exit status, the kernel log and whatever the command wrote to $THINWATCHD_VM_OUT come back
# through /vmbed/out. The scratch disk is formatted (first use only) and mounted at /scratch.

out=/vmbed/out
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The boot is over: the host stops counting its boot deadline (tests/vm/runner.py).
: > "$out/started"

port() {
    for dir in /sys/class/virtio-ports/*; do
        if [ "$(cat "$dir/name" 2>/dev/null)" = "$1" ]; then
            echo "/dev/${dir##*/}"
            return 0
        fi
    done
    echo /dev/console
}

if [ -b /dev/vda ]; then
    if [ -z "$(blkid -p -o value -s TYPE /dev/vda 2>/dev/null)" ]; then
        mkfs.ext4 -q -F -L thinwatchd-scratch \
            -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 /dev/vda \
            || echo "run-payload: mkfs.ext4 /dev/vda failed" >&2
    fi
    mkdir -p /scratch
    mount -t ext4 -o noinit_itable /dev/vda /scratch || echo "run-payload: cannot mount /scratch" >&2
fi

stdout_port=$(port org.thinwatchd.stdout)
stderr_port=$(port org.thinwatchd.stderr)

. /vmbed/payload.env
"$@" </dev/null >"$stdout_port" 2>"$stderr_port"
status=$?

dmesg > "$out/dmesg.txt" 2>&1
cd /
sync
mountpoint -q /scratch && umount /scratch
echo "$status" > "$out/exit-status"
exit "$status"
