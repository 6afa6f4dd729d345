"""LocalStorage primary storage: every host keeps its share on its own disks. ``node.py`` is the
management node's part, ``agent.py`` the host agent's."""
