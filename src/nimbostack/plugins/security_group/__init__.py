"""Security groups (ZStack's SecurityGroup network service): ``node.py`` is the management node's
part (the API, the provider, the hooks that tell hosts what to enforce), ``host/`` the host
agent's (one nftables chain per NIC in the bridge family, beside the Flat anti-spoofing tables)."""
