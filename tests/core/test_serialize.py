"""Serialisation to iptables-restore text: pure twin and Cython accelerator, byte for byte."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import policy
from agent.core.model import Network
from agent.firewall.iptables import rules, transaction
from agent.firewall.iptables import serialize as pure

try:
    fast: ModuleType | None = importlib.import_module("_fast.serialize")
except ImportError:  # pragma: no cover - extension not built
    fast = None

needs_fast = pytest.mark.skipif(fast is None, reason="_fast.serialize is not built")
IMPLS = [pytest.param(pure, id="pure"), pytest.param(fast, id="cython", marks=needs_fast)]

QUOTING = [
    ("netagent", "netagent"),
    ("RELATED,ESTABLISHED", "RELATED,ESTABLISHED"),
    ("10.0.0.0/24", "10.0.0.0/24"),
    ("!", "!"),
    ("", '""'),
    ("my rule", '"my rule"'),
    ("tab\there", '"tab\there"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("it's", '"it\\\'s"'),
    ("back\\slash", '"back\\\\slash"'),
    ("ünïcode", "ünïcode"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("token", "written"), QUOTING)
def test_quote_like_iptables_save(impl: ModuleType, token: str, written: str) -> None:
    assert impl.quote(token) == written
    assert impl.format_op("-A", "C", ("-m", "comment", "--comment", token)) == (
        f"-A C -m comment --comment {written}"
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b"])
def test_unrepresentable_tokens_are_refused(impl: ModuleType, bad: str) -> None:
    with pytest.raises(ValueError):
        impl.quote(bad)
    with pytest.raises(ValueError):
        impl.serialize([("filter", (), (("-A", "C", ("-j", bad)),))])
    with pytest.raises(ValueError):
        impl.serialize([("filter", ("bad chain",), ())])


@pytest.mark.parametrize("impl", IMPLS)
def test_serialize_exact_text(impl: ModuleType) -> None:
    script = transaction.Script(
        (
            transaction.TableScript(
                "filter",
                ("NETAGENT-N-1",),
                (
                    ("-A", "NETAGENT-N-1", ("-i", "br-1", "!", "-o", "br-1", "-j", "ACCEPT")),
                    ("-I", "FORWARD", ("1", "-m", "comment", "--comment", "netagent", "-j", "X")),
                    ("-F", "NETAGENT-N-2", ()),
                    ("-X", "NETAGENT-N-2", ()),
                ),
            ),
            transaction.TableScript(
                "nat", (), (("-D", "P", ("-s", "10.0.0.0/8", "-j", "MASQUERADE")),)
            ),
        )
    )
    assert impl.serialize(script) == (
        "*filter\n"
        ":NETAGENT-N-1 - [0:0]\n"
        "-A NETAGENT-N-1 -i br-1 ! -o br-1 -j ACCEPT\n"
        "-I FORWARD 1 -m comment --comment netagent -j X\n"
        "-F NETAGENT-N-2\n"
        "-X NETAGENT-N-2\n"
        "COMMIT\n"
        "*nat\n"
        "-D P -s 10.0.0.0/8 -j MASQUERADE\n"
        "COMMIT\n"
    )
    assert impl.serialize(script.tables) == impl.serialize(script)  # the plain structure
    assert impl.serialize(transaction.Script()) == ""


# Tokens: mostly ordinary, often with the characters that need quoting, sometimes forbidden.
tokens = st.one_of(
    st.text(alphabet="abcXYZ019-_,/!.:", min_size=1, max_size=12),
    st.text(alphabet=" \t\x0b\x0c\"'\\ab", max_size=6),
    st.text(max_size=8),
)
# Mostly plain ASCII, so that whole scripts often take the Cython fast path (all tuples, no
# quoting), with now and then an empty, non-ASCII or special token that sends it elsewhere.
plain_tokens = st.one_of(
    st.text(alphabet="abcXYZ019-_,/!.:", min_size=1, max_size=12),
    st.sampled_from(["", "ü", "a b", "\x0c", "\x7f", "~"]),
)
names = st.text(alphabet="ABCXYZ-_019", min_size=1, max_size=10)


def scripts(token: st.SearchStrategy[str]) -> st.SearchStrategy[list]:
    args = st.one_of(st.lists(token, max_size=9).map(tuple), st.lists(token, max_size=9))
    ops = st.tuples(st.sampled_from(["-A", "-D", "-I", "-F", "-X"]), names, args)
    sections = st.tuples(names, st.lists(names, max_size=3), st.lists(ops, max_size=8))
    return st.lists(sections, max_size=3)


def outcome(impl: ModuleType, script: object) -> tuple[str, str]:
    try:
        return "ok", impl.serialize(script)
    except ValueError:
        return "ValueError", ""


@needs_fast
@settings(max_examples=400, deadline=None)
@given(script=st.one_of(scripts(tokens), scripts(plain_tokens)))
def test_cython_matches_pure_twin(script: list) -> None:
    assert outcome(fast, script) == outcome(pure, script)
    for _, _, section_ops in script:
        for op, chain, args in section_ops:
            try:
                expected = pure.format_op(op, chain, args)
            except ValueError:
                with pytest.raises(ValueError):
                    fast.format_op(op, chain, args)
            else:
                assert fast.format_op(op, chain, args) == expected


@needs_fast
def test_cython_matches_pure_on_a_rendered_ruleset() -> None:
    networks = [
        Network(
            id=f"{i:012x}" + "0" * 52,
            name=f"n{i}",
            bridge=f"br-{i:012x}",
            subnet=f"10.{i // 256}.{i % 256}.0/24",
            gateway=f"10.{i // 256}.{i % 256}.1",
            internal=i % 5 == 0,
            icc=i % 3 != 0,
        )
        for i in range(300)
    ]
    script = transaction.full(rules.render(policy.build(networks).v4))
    assert fast.serialize(script) == pure.serialize(script)
    assert (
        fast.serialize(script).count("\n-A ") == len(script) - 307 - 4
    )  # minus declarations (300 networks, 7 shared chains), -I jumps
