"""What the LocalStorage plugin gives the management node."""

from __future__ import annotations

from nimbostack.plugins.loader import Plugin
from nimbostack.plugins.local_storage import api, migration  # noqa: F401  (their @api handlers)
from nimbostack.plugins.local_storage.backend import LOCAL

PLUGIN = Plugin(name="local_storage", primary_storage=(LOCAL,))
