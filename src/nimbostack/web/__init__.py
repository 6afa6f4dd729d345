"""The web pages the management node serves, and their static files (``static/``: the console
page and the vendored noVNC client, see ``static/novnc/README.md``)."""

from pathlib import Path

STATIC = Path(__file__).with_name("static")
UI = STATIC / "ui"  # the web UI served at / (api/web.py)

