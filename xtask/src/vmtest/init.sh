#!/bin/busybox sh
# PID 1 of a kernel-matrix VM. Loads the modules the initramfs carries (9p over virtio, veth),
# mounts the root file system the host shares read-only (its own, or a userland for the
# guest's architecture with the workspace shared beside it) and runs the guest script the host
# named on the kernel command line inside it: the tests run the host's binaries against this
# kernel.
/bin/busybox mkdir -p /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

for module in $(cat /modules/order); do
    insmod "/modules/$module.ko" || echo "vmtest: insmod $module failed"
done

script=$(sed -n 's/.*tcpstate.script=\([^ ]*\).*/\1/p' /proc/cmdline)
# Directories the host lets the guest cover with tmpfs: none of them holds the workspace.
scratch=$(sed -n 's/.*tcpstate.tmpfs=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
# The workspace, when the shared root does not hold it: mounted at its own path.
work=$(sed -n 's/.*tcpstate.work=\([^ ]*\).*/\1/p' /proc/cmdline)
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 host /host; then
    echo "vmtest: mounting the host's root over 9p failed"
    poweroff -f
fi
for fs in proc sys dev; do mount --bind "/$fs" "/host/$fs"; done
# What the tests write: scratch space, network namespaces, HOME.
for dir in $scratch; do mount -t tmpfs scratch "/host$dir"; done
tmpdir=$(echo $scratch | cut -d' ' -f1)
if [ -n "$work" ]; then
    # A scratch tmpfs may cover where the host created the mount point.
    mkdir -p "/host$work" 2>/dev/null
    if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 work "/host$work"; then
        echo "vmtest: mounting the workspace over 9p failed"
        poweroff -f
    fi
fi
mount -t tracefs tracefs /host/sys/kernel/tracing
mount -t bpf bpf /host/sys/fs/bpf
# As systemd does on a host: without it, 5.10 lists no cgroup for a process at all.
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup
mount -t devpts devpts /host/dev/pts 2>/dev/null

echo "VMTEST-KERNEL $(uname -r)"
chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME="$tmpdir" TMPDIR="$tmpdir" /bin/sh -c "ip link set lo up && cd $tmpdir && . $script"
echo "VMTEST-DONE rc=$?"
poweroff -f
