"""GET /docs: the OpenAPI document as one self-contained HTML page, readable with no network."""

from __future__ import annotations

from functools import cache
from html import escape
from typing import Any

from nimbostack.api.openapi import openapi_document

# Inline, as is everything on the page: a node is often run where no CDN can be reached.
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; }
code { font: 13px ui-monospace, monospace; }
section { border-top: 1px solid #ccc; padding: .4em 0; }
h2 { font-size: 1em; margin: .2em 0; }
ul { margin: .2em 0; }
.req { font-weight: bold; }
.enum { color: #555; }
"""


def _field(name: str, schema: dict[str, Any], required: bool) -> str:
    kind = schema.get("type", "")
    if "anyOf" in schema:  # a list, as an array or ZStack CLI's comma-separated string
        kind = "list"
    elif isinstance(kind, list):
        kind = "scalar"
    line = f'<li><code class="{"req" if required else ""}">{escape(name)}</code>'
    if kind:
        line += f" <i>{escape(kind)}</i>"
    if required:
        line += " (mandatory)"
    if "enum" in schema:
        line += f' <span class="enum">one of {escape(", ".join(map(str, schema["enum"])))}</span>'
    if "description" in schema:
        line += f" &mdash; {escape(schema['description'])}"
    return line + "</li>"


def _message(name: str, schema: dict[str, Any]) -> str:
    ((full_name, body),) = schema["properties"].items()
    required = set(body.get("required", []))
    fields = "".join(_field(f, s, f in required) for f, s in body["properties"].items())
    return (
        f'<section id="{escape(name)}"><h2>{escape(name)}</h2>'
        f"<code>{escape(full_name)}</code><ul>{fields}</ul></section>"
    )


@cache
def docs_page() -> str:
    doc = openapi_document()
    paths = "".join(
        f"<li><code>{escape(method.upper())} {escape(path)}</code> &mdash; {escape(op.get('summary', ''))}</li>"
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if not path.startswith("/zstack/api/org.")
    )
    schemas = doc["components"]["schemas"]
    # the messages: the operations of their own paths (the others are the wire's shared ones)
    names = sorted(op["operationId"] for path, ops in doc["paths"].items() for op in ops.values()
                   if path.startswith("/zstack/api/org."))
    index = " ".join(f'<a href="#{escape(n)}">{escape(n)}</a>' for n in names)
    messages = "".join(_message(n, schemas[n]) for n in names)
    title = escape(doc["info"]["title"])
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>Post <code>{{&quot;&lt;message name&gt;&quot;: {{fields}}}}</code> to the API; "
        f'the machine-readable document is <a href="openapi.json">openapi.json</a>.</p>'
        f"<ul>{paths}</ul><p>{len(names)} messages: {index}</p>{messages}</body></html>"
    )
