"""What the LocalStorage plugin gives the management node."""

from __future__ import annotations

from nimbostack.plugins.loader import Plugin
from nimbostack.plugins.local_storage import api, migration
from nimbostack.plugins.local_storage.backend import LOCAL

PLUGIN = Plugin(name="local_storage", apis=(api, migration), primary_storage=(LOCAL,))
