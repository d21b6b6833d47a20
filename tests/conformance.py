"""`assert_implements`: an object keeps a Protocol's members, names and signatures alike.

For fakes (tests/core) and real shells: a fake that drifted from the protocol it stands for
would let the service tests pass against an interface the daemon no longer has.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Protocol


def protocol_members(protocol: type) -> dict[str, Any]:
    """Public members of `protocol` and of the protocols it extends: name -> the function, or
    None for a data member (an annotation or a property)."""
    members: dict[str, Any] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, Protocol, typing.Generic):
            continue
        for name in vars(klass).get("__annotations__", {}):
            if not name.startswith("_"):
                members[name] = None
        for name, value in vars(klass).items():
            if not name.startswith("_") and (callable(value) or isinstance(value, property)):
                members[name] = value if callable(value) else None
    return members


def _parameters(sig: inspect.Signature, *, drop_self: bool) -> list[inspect.Parameter]:
    params = list(sig.parameters.values())
    return params[1:] if drop_self else params


def _resolved(annotation: Any, fn: Any) -> Any:
    """A string annotation evaluated where `fn` was defined; as written if it cannot be (a name
    imported for type checkers only)."""
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, getattr(inspect.unwrap(fn), "__globals__", {}))
    except Exception:
        return annotation


def _same(want: Any, want_fn: Any, have: Any, have_fn: Any) -> bool:
    """Whether two annotations name the same type (`have` empty: not annotated, accepted)."""
    if have is inspect.Parameter.empty or have == want:
        return True
    a, b = _resolved(want, want_fn), _resolved(have, have_fn)
    if isinstance(a, str) or isinstance(b, str):  # one side unresolvable: compare as written
        return False
    return bool(a == b)


def _mismatches(name: str, want: Any, have: Any) -> list[str]:
    """How method `have` (bound) differs from the protocol's function `want`."""
    if not callable(have):
        return [f"{name}: not callable"]
    if inspect.iscoroutinefunction(want) != inspect.iscoroutinefunction(have):
        kind = "async" if inspect.iscoroutinefunction(want) else "a plain function"
        return [f"{name}: must be {kind}"]
    wanted = inspect.signature(want)
    found = inspect.signature(have)
    expected = _parameters(wanted, drop_self=True)
    actual = _parameters(found, drop_self=False)
    shape = [(p.name, p.kind, p.default) for p in expected]
    if [(p.name, p.kind, p.default) for p in actual] != shape:
        return [f"{name}{found} differs from the protocol's {name}{wanted}"]
    fn = getattr(have, "__func__", have)
    problems = [
        f"{name}: parameter {p.name} is annotated {q.annotation!r}, not {p.annotation!r}"
        for p, q in zip(expected, actual, strict=True)
        if not _same(p.annotation, want, q.annotation, fn)
    ]
    returns = found.return_annotation
    if returns is not inspect.Signature.empty and not _same(
        wanted.return_annotation, want, returns, fn
    ):
        problems.append(f"{name}: returns {returns!r}, not {wanted.return_annotation!r}")
    return problems


def assert_implements(obj: object, protocol: type) -> None:
    """Assert that `obj` has every member of `protocol`, each method with its signature.

    Compared for each method: async or not, and `inspect.signature` without `self`: parameter
    names, kinds and defaults exactly; annotations where `obj` has them: the same type once
    evaluated where each was written (`Ruleset` and `rules.Ruleset` agree), else the same text
    (a name imported only for type checkers). A data member must exist. Every problem is
    reported at once.
    """
    problems = []
    for name, want in protocol_members(protocol).items():
        if not hasattr(obj, name):
            problems.append(f"{name}: missing")
        elif want is not None:
            problems += _mismatches(name, want, getattr(obj, name))
    assert not problems, f"{type(obj).__name__} does not implement {protocol.__name__}:\n" + (
        "\n".join(problems)
    )
