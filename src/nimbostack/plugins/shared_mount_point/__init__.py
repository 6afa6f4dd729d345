"""SharedMountPoint primary storage (release 1.2): one file system every host has mounted.
``node.py`` is the management node's part, ``agent.py`` the host agent's."""
