#!/bin/sh
# Polls /sys/block and /sys/class/net every 0.5 s and reports hot-plugged
# disks and NICs.  A new NIC gets DHCP like the ones present at boot.
# The first scan (devices present at start) is taken as known.
. /etc/nimbo/lib.sh

scan() {
    D=" "
    for p in /sys/block/*; do
        d=${p##*/}
        case "$d" in loop*|ram*|zram*|sr*|fd*|'*') continue ;; esac
        D="$D$d "
    done
    N=" "
    for p in /sys/class/net/*; do
        n=${p##*/}
        case "$n" in lo|'*') continue ;; esac
        N="$N$n "
    done
}

scan
disks=$D
nics=$N
while :; do
    sleep 0.5
    scan
    [ "$D" = "$disks" ] && [ "$N" = "$nics" ] && continue
    for d in $D; do
        case "$disks" in *" $d "*) continue ;; esac
        size=0
        read -r sectors <"/sys/block/$d/size" && size=$((sectors * 512))
        say DISK-ADDED "$d" "$size"
    done
    for d in $disks; do
        case "$D" in *" $d "*) continue ;; esac
        say DISK-REMOVED "$d"
    done
    for n in $N; do
        case "$nics" in *" $n "*) continue ;; esac
        mac=$(cat "/sys/class/net/$n/address" 2>/dev/null)
        say NIC-ADDED "$n" "mac=$mac"
        dhcp_iface "$n" &
    done
    for n in $nics; do
        case "$N" in *" $n "*) continue ;; esac
        say NIC-REMOVED "$n"
        [ -f "$NIMBO_RUN/udhcpc.$n.pid" ] && kill "$(cat "$NIMBO_RUN/udhcpc.$n.pid")" 2>/dev/null
        rm -f "$NIMBO_RUN/udhcpc.$n.pid" "$NIMBO_RUN/dhcp.$n"
    done
    disks=$D
    nics=$N
done
