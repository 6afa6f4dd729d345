"""How a comma list of system tags splits. A tag's value may itself hold commas (the spec's
userdata example has ``[foo,bar]``), so a comma only starts a new tag when what follows looks like
a tag's ``name::``."""

from __future__ import annotations

import re

_TAG_START = re.compile(r"^[A-Za-z][\w.-]*::")


def join_tag_pieces(pieces: list[str]) -> list[str]:
    """Re-join the pieces of a naive comma split that belong to the previous tag."""
    tags: list[str] = []
    for piece in pieces:
        if tags and not _TAG_START.match(piece.strip()):
            tags[-1] += "," + piece
        else:
            tags.append(piece)
    return [t.strip() for t in tags if t.strip()]
