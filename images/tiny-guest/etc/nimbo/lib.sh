# Shared helpers for the nimbostack tiny guest (busybox ash).
# Every line the harness greps for goes to the console, prefixed NIMBO-.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
NIMBO_RUN=/run/nimbo

say() {
    # One write() per line so that concurrent writers do not interleave.
    echo "NIMBO-$*" >/dev/console
}

uptime_s() {
    read -r _up _idle </proc/uptime
    echo "$_up"
}

# cmdline_arg NAME DEFAULT: value of NAME=... on the kernel command line.
cmdline_arg() {
    _v=$2
    for _w in $(cat /proc/cmdline); do
        case "$_w" in
            "$1"=*) _v=${_w#*=} ;;
        esac
    done
    echo "$_v"
}

# dhcp_iface IFACE: bring IFACE up and start udhcpc on it.  udhcpc returns as
# soon as it has a lease (it then keeps renewing in the background) or after
# its first round of discovers failed (it then keeps trying in the background).
# The udhcpc script prints NIMBO-DHCP when a lease is bound.
dhcp_iface() {
    _if=$1
    ip link set "$_if" up 2>/dev/null
    udhcpc -i "$_if" -s /etc/nimbo/udhcpc.script -b -O staticroutes \
        -t "$(cmdline_arg nimbo.dhcp_tries 6)" -T 1 -A 3 \
        -p "$NIMBO_RUN/udhcpc.$_if.pid" >/dev/null 2>&1 </dev/null
    if [ ! -f "$NIMBO_RUN/dhcp.$_if" ]; then
        say DHCP-FAILED "$_if" "(still trying in the background)"
    fi
}

# fetch URL TIMEOUT: body on stdout, non-zero exit on any failure.
fetch() {
    timeout "$2" wget -q -O - "$1" 2>/dev/null
}
