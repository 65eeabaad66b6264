"""Looking inside exception groups, one way everywhere.

Trio's nurseries wrap what their tasks raise in (possibly nested) exception
groups; a caller that wants to show one clear line, or to decide by the kind
of error, needs the leaves, in the order the tasks raised them.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["contains", "first_leaf", "leaves"]


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """Every exception that is not a group, depth first, in order; `exc` itself if it is not a group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def first_leaf(exc: BaseException, *prefer: type[BaseException]) -> BaseException:
    """The most telling error inside `exc`: the first leaf of the first kind in `prefer`
    that has one, else the first leaf (`exc` itself if it holds none)."""
    found = list(leaves(exc))
    for kind in prefer:
        for leaf in found:
            if isinstance(leaf, kind):
                return leaf
    return found[0] if found else exc


def contains(exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
    """Whether `exc` is, or holds at any depth, an exception of `kind`."""
    return isinstance(exc, kind) or any(isinstance(leaf, kind) for leaf in leaves(exc))
