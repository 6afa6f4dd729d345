"""The Flat network service provider: DHCP, userdata and EIP served by every host for the VMs it
runs, with no appliance. ``node.py`` is the management node's part, ``agent/`` the host agent's."""
