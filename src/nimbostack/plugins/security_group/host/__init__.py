"""The SecurityGroup provider on a host: ``render.py`` turns the node's per-NIC rules into an
nftables file, ``service.py`` applies it with ``nft -f``, ``commands.py`` is the ``/sg/*`` wire."""
