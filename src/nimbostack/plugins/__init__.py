"""Plugins: one folder each. A folder's ``node.py`` declares what the plugin gives the management
node (``PLUGIN = Plugin(...)``, read by ``plugins/loader.py``); its ``agent.py`` or ``agent/``
declares what it gives the host agent (``AGENT = AgentPlugin(...)``, read by
``agent/plugins.py``). The two halves share only ``nimbostack.wire``; this package imports
nothing, so the agent loading its half loads no management code."""
