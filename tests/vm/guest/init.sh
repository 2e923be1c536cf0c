#!/bin/busybox sh
# PID 1 of the thinwatchd test guest, from the initramfs (busybox only).
#
# Loads the modules, builds the guest's root (the host's / over 9p, read-only, under a tmpfs
# overlay), mounts the per-run share at /vmbed and reads /vmbed/boot.env, then either
#   plain:   runs /vmbed/run-payload.sh chrooted into that root and powers off, or
#   systemd: copies /vmbed/etc/ (units, masks) over /etc and switch_roots to systemd.
# Anything that goes wrong powers the guest off; the host then reports the console tail.

/bin/busybox --install -s /bin
export PATH=/bin

say() { echo "thinwatchd-vm-init: $*"; }
stage() { read -r up _ < /proc/uptime; say "$* (${up}s)"; }
die() { say "FATAL: $*"; sync; poweroff -f; sleep 5; }

mount -t devtmpfs -o mode=0755 devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
stage "init started"

while read -r module; do
    insmod "/lib/modules/$module.ko" || say "insmod $module failed"
done < /lib/modules/load-order
stage "modules loaded"

mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /lower \
    || die "cannot mount the host's root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 upper /upper || die "cannot mount the overlay's tmpfs"
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
    || die "cannot mount the overlay root"

mkdir -p /newroot/vmbed
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 vmbed /newroot/vmbed \
    || die "cannot mount the run's share (9p tag vmbed)"
[ -r /newroot/vmbed/boot.env ] || die "no /vmbed/boot.env"
. /newroot/vmbed/boot.env

# The host's fstab is not this guest's: nothing must try to mount the host's disks.
: > /newroot/etc/fstab
# The host may be a container; this guest is a VM (systemd would otherwise ignore the kernel
# command line and skip the units that are conditional on a real machine).
rm -f /newroot/.dockerenv /newroot/.containerenv /newroot/run/systemd/container
# modprobe works inside the guest: the whole module tree of the guest's kernel is in the cache.
release=$(uname -r)
if [ -n "$VMBED_MODULES_DIR" ] && [ -d "/newroot$VMBED_MODULES_DIR" ]; then
    mkdir -p "/newroot/lib/modules/$release"
    mount --bind "/newroot$VMBED_MODULES_DIR" "/newroot/lib/modules/$release"
fi
mkdir -p /newroot/scratch
stage "root ready, starting $VMBED_MODE mode"

case "$VMBED_MODE" in
systemd)
    cp -a /newroot/vmbed/etc/. /newroot/etc/ || die "cannot install the guest's /etc additions"
    mount --move /dev /newroot/dev
    mount --move /proc /newroot/proc
    mount --move /sys /newroot/sys
    exec switch_root /newroot /lib/systemd/systemd
    ;;
plain)
    [ -e /dev/mapper/control ] || { mkdir -p /dev/mapper; mknod /dev/mapper/control c 10 236; }
    mkdir -p /dev/pts /dev/shm
    mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
    mount -t tmpfs -o mode=1777 shm /dev/shm
    ln -sf /proc/self/fd /dev/fd
    ln -sf /proc/self/fd/0 /dev/stdin
    ln -sf /proc/self/fd/1 /dev/stdout
    ln -sf /proc/self/fd/2 /dev/stderr
    mount --bind /dev /newroot/dev
    mount --bind /dev/pts /newroot/dev/pts
    mount --bind /dev/shm /newroot/dev/shm
    mount --bind /proc /newroot/proc
    mount --bind /sys /newroot/sys
    mount -t tmpfs -o mode=0755 run /newroot/run
    hostname thinwatchd-vm
    chroot /newroot /bin/sh /vmbed/run-payload.sh
    sync
    poweroff -f
    ;;
*)
    die "unknown VMBED_MODE '$VMBED_MODE'"
    ;;
esac
die "unreachable"
