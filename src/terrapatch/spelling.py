"""How a facade spells the core's parameters: neutral identifiers renamed in errors and logs.

The core names a parameter by its Python keyword, the *neutral identifier*:
``spcscale``, ``tile_size``, ``tile_size[0]`` (one axis of a pair), ``model``,
``output_names``, and, per source, ``source1`` (its rasters), ``source1.patch_size``,
``source1.nodata``. Every error about a parameter starts with its identifier::

    spcscale: 1.5 is neither an integer k nor 1/k ...

A facade keeps a table from identifiers to its own spelling (the OTBTF keys live in
``terrapatch.apps``) and runs the core inside :func:`respelled`, which rewrites the
messages of the errors raised and of the ``terrapatch`` log records emitted meanwhile::

    output.spcscale: 1.5 is neither an integer k nor 1/k ...

What is rewritten, so that prose is never touched:

- the *subject*, the identifier that starts a message before ``": "`` (or before a
  parenthesis, ``source1 (a.tif): ...``), whatever it is;
- *mentions* elsewhere in the message, of identifiers that cannot be English words:
  those holding ``_``, ``.`` or ``[`` (``tile_size``, ``source2.patch_size``), the
  :data:`JARGON` (``spcscale``), and any identifier written as an assignment
  (``margin=8``).

Table keys may contain ``{source}``, which stands for ``source1``, ``source2``, …
(and ``sourceK``, meaning any of them); the value's ``{source}`` becomes that name.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping

from terrapatch.errors import TerrapatchError

__all__ = ["JARGON", "SOURCE", "Spelling", "respelled"]

#: Plain identifiers that are no English word, hence recognised anywhere in a message.
JARGON = frozenset({"spcscale", "efield", "fullyconv", "argmax"})

#: Placeholder of a source's name in a table key or value.
SOURCE = "{source}"
_SOURCE_NAME = r"source(?:\d+|K)"
#: Characters that may not touch an identifier: it is not part of a path, a word or a key.
_BEFORE = r"(?<![\w./\\'\"-])"
_AFTER = r"(?![\w\[-]|\.\w)"


class Spelling:
    """A table from neutral identifiers to a facade's spelling, applied to messages.

    Parameters
    ----------
    names
        Neutral identifier → spelling, e.g. ``{"spcscale": "output.spcscale",
        "{source}.patch_size[0]": "{source}.rfieldx"}``. Identifiers not in the table
        are left as they are.

    Examples
    --------
    >>> Spelling({"tile_size": "optim.tilesizex/y"})("tile_size: 0 must be ≥ 1")
    'optim.tilesizex/y: 0 must be ≥ 1'
    """

    def __init__(self, names: Mapping[str, str]) -> None:
        self.names = dict(names)
        #: Regular expression of each key, source placeholders made groups.
        self._keys = sorted(self.names, key=len, reverse=True)
        patterns = [re.escape(k).replace(re.escape(SOURCE), f"(?P<s{i}>{_SOURCE_NAME})")
                    for i, k in enumerate(self._keys)]
        alternatives = "|".join(f"(?P<k{i}>{p})" for i, p in enumerate(patterns))
        self._subject = re.compile(rf"^\s*(?:{alternatives})(?=:| \()") if patterns else None
        self._mention = re.compile(rf"{_BEFORE}(?:{alternatives}){_AFTER}") \
            if patterns else None

    def __call__(self, text: str) -> str:
        """``text`` with the identifiers of this table in their facade spelling."""
        if self._subject is None or self._mention is None:
            return text
        subject = self._subject.match(text)
        start = 0
        head = ""
        if subject is not None:
            head = text[:subject.start()] + self._spell(subject, mention=False)
            start = subject.end()
        body = self._mention.sub(lambda m: self._spell(m, mention=True), text[start:])
        return head + body

    def _spell(self, match: re.Match[str], mention: bool) -> str:
        """The spelling of the identifier ``match`` found (unchanged if not a mention)."""
        index = next(int(name[1:]) for name, value in match.groupdict().items()
                     if name.startswith("k") and value is not None)
        key = self._keys[index]
        found = match.group(f"k{index}")
        if mention and not _is_mention(key, match):
            return found
        spelled = self.names[key]
        source = match.groupdict().get(f"s{index}")
        return spelled.replace(SOURCE, source) if source else spelled


def _is_mention(key: str, match: re.Match[str]) -> bool:
    """Whether an identifier inside a message is surely one, not an English word."""
    if any(c in key.replace(SOURCE, "") for c in "_.[") or (SOURCE in key and key != SOURCE):
        return True
    return match.string.startswith("=", match.end())


@contextlib.contextmanager
def respelled(names: Mapping[str, str] | Spelling) -> Iterator[Spelling]:
    """Run a block whose errors and ``terrapatch`` log records use the facade's spelling.

    A :class:`~terrapatch.errors.TerrapatchError` raised in the block is re-raised as
    it is (same class, same traceback), its message respelled. Log records of the
    ``terrapatch`` logger emitted meanwhile, from any thread, are respelled too.
    Blocks nest: the innermost table applies first.
    """
    spelling = names if isinstance(names, Spelling) else Spelling(names)
    log = logging.getLogger("terrapatch")
    spell_record = _RecordSpeller(spelling)
    log.filters.insert(0, spell_record)  # the innermost table applies first
    try:
        yield spelling
    except TerrapatchError as exc:
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (spelling(exc.args[0]), *exc.args[1:])
        raise
    finally:
        log.removeFilter(spell_record)


class _RecordSpeller(logging.Filter):
    """A logger filter that respells each record's message (it never drops one)."""

    def __init__(self, spelling: Spelling) -> None:
        super().__init__()
        self.spelling = spelling

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()  # arguments may name parameters too
        except (TypeError, ValueError):  # a malformed record: leave it to logging
            return True
        record.msg, record.args = self.spelling(message), ()
        return True
