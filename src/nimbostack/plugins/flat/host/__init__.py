"""The Flat network service provider on a host: distributed DHCP (one dnsmasq per L3 network in a
network namespace), the metadata/userdata HTTP service (CloudStack and EC2 style) and bridge
anti-spoofing rules, driven by the ``/flat/*`` agent commands (``commands.py``).

Kept import-light on purpose: ``python -m nimbostack.plugins.flat.host.metadata`` runs inside the
namespace and must start fast."""
