"""Tab completion for the ``>>>`` prompt.

First word: command names (and the shell's own words). After a command: its parameters as
``name=``; for Query commands also the queryable fields ``field=`` and expandable ones
``field.`` (walked through nested objects: ``vmNics.l3Network.``), the field list of
``fields=a,b,``, and the valid values of ``key=``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from nimbostack.cli.spec import ApiSpec, Command, QueryObject

SHELL_WORDS = ("help", "exit", "quit")


def _match(current: str, words: Iterable[str]) -> list[str]:
    low = current.lower()
    words = list(dict.fromkeys(words))
    prefixed = [w for w in words if w.lower().startswith(low)]
    if prefixed or not low:
        return prefixed
    return [w for w in words if low in w.lower()]  # like zstack-cli: fall back to substrings


class CliCompleter(Completer):
    def __init__(self, spec: ApiSpec) -> None:
        self.spec = spec

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        current = "" if not text or text[-1].isspace() else text.split()[-1]
        for word in self.candidates(text):
            yield Completion(word, start_position=-len(current))

    def candidates(self, text: str) -> list[str]:
        """Replacements for the word under the cursor (the last word of ``text``)."""
        words = text.split()
        if text and not text[-1].isspace():
            previous, current = words[:-1], words[-1]
        else:
            previous, current = words, ""
        if not previous:
            return _match(current, [*self.spec.command_names, *SHELL_WORDS])
        if previous[0] in ("help", "?"):
            return _match(current, self.spec.command_names) if len(previous) == 1 else []
        command = self.spec.get(previous[0])
        if command is None:
            return []
        if "=" in current:
            return self._values(command, current)
        used = {w.split("=", 1)[0] for w in previous[1:] if "=" in w}
        return _match(current, self._names(command, current, used))

    def _query_root(self, command: Command) -> QueryObject | None:
        return self.spec.query_object_for(command) if command.is_query else None

    def _names(self, command: Command, current: str, used: set[str]) -> list[str]:
        root = self._query_root(command)
        if root is not None and "." in current:
            prefix, _, _ = current.rpartition(".")
            obj = self.spec.resolve_path(root, prefix.split("."))
            return self._query_fields(obj, prefix + ".") if obj else []
        names = [
            f"{f.name}="
            for f in command.fields.values()
            if not (command.is_query and f.name == "conditions") and (f.is_list or f.name not in used)
        ]
        return self._query_fields(root, "") + names if root else names

    @staticmethod
    def _query_fields(obj: QueryObject | None, prefix: str) -> list[str]:
        if obj is None:
            return []
        primitive = [f"{prefix}{f}=" for f in obj.primitive_fields]
        return primitive + [f"{prefix}{f}." for f in obj.expanded_fields]

    def _values(self, command: Command, current: str) -> list[str]:
        key, _, value = current.partition("=")
        root = self._query_root(command)
        if key == "fields" and root is not None:
            done, _, last = value.rpartition(",")
            chosen = set(done.split(",")) if done else set()
            head = f"fields={done}," if done else "fields="
            return [head + f for f in _match(last, root.primitive_fields) if f not in chosen]
        fld = command.fields.get(key)
        if fld is None or not fld.valid_values:
            return []
        return [f"{key}={v}" for v in _match(value, fld.valid_values)]
