"""Assertion for facade tests: one error, read in the core's names and in a facade's.

A facade over the core (terrapatch's OTBTF applications, or a user's own) respells
the core's neutral identifiers (:mod:`terrapatch.spelling`). :func:`assert_respelled`
checks that a message raised by the core and the one the facade raised for the same
bad value say the same thing, each in its own names; a :class:`SpellingCase` is one
such bad value, given both ways.

Examples
--------
>>> from terrapatch.testing.spellings import assert_respelled
>>> assert_respelled("spcscale: 1.5 is neither an integer k nor 1/k",
...                  "output.spcscale: 1.5 is neither an integer k nor 1/k",
...                  [("spcscale", "output.spcscale")])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from terrapatch.errors import TerrapatchError


def assert_respelled(core: str, facade: str, names: Sequence[tuple[str, str]]) -> None:
    """Check that ``facade`` is ``core`` with its identifiers respelled.

    Parameters
    ----------
    core, facade
        The two messages.
    names
        ``(neutral, spelled)`` pairs: the message's subject first, then each identifier
        its body mentions (every occurrence in the body is replaced).

    Raises
    ------
    AssertionError
        Naming what differs: a subject, a mention the core's message lacks, or the
        first differing text.
    """
    if not names:
        raise AssertionError("names: give at least the subject's (neutral, spelled) pair")
    (neutral, spelled), *mentions = names
    if not core.startswith(f"{neutral}: "):
        raise AssertionError(f"the core's message does not start with {neutral!r}: {core!r}")
    if not facade.startswith(f"{spelled}: "):
        raise AssertionError(f"the facade's message does not start with {spelled!r}: "
                             f"{facade!r}")
    body = core.removeprefix(neutral)
    for name, key in mentions:
        if name not in body:
            raise AssertionError(f"the core's message does not mention {name!r}: {core!r}")
        body = body.replace(name, key)
    if facade != spelled + body:
        raise AssertionError(f"the messages differ beyond their names:\n  expected "
                             f"{spelled + body!r}\n  got      {facade!r}")


@dataclass(frozen=True)
class SpellingCase:
    """One bad value, given to the core and to a facade over it.

    Attributes
    ----------
    core, facade
        Callables that take the same argument (a test's scene) and must raise a
        :class:`~terrapatch.errors.TerrapatchError`.
    names
        As for :func:`assert_respelled`: the subject's ``(neutral, spelled)`` pair, then
        the mentions'.
    """

    core: Callable[[Any], Any]
    facade: Callable[[Any], Any]
    names: tuple[tuple[str, str], ...]

    def check(self, scene: Any) -> None:
        """Run both; raise :class:`AssertionError` unless their errors match (respelled)."""
        assert_respelled(_message(self.core, scene), _message(self.facade, scene), self.names)


def _message(run: Callable[[Any], Any], scene: Any) -> str:
    """The message of the terrapatch error ``run(scene)`` raises."""
    try:
        run(scene)
    except TerrapatchError as exc:
        return str(exc)
    raise AssertionError(f"{getattr(run, '__name__', run)!r} raised no terrapatch error")
