"""Property tests of workload names (agent/identity/names.py): trust domains, `ns/name`
identities and SPIFFE IDs. Whatever text comes in, the answer is a name that meets the spec
exactly (no control character, no trailing newline, no upper case) or InvalidName, and an
accepted name prints back as the text it was read from."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.identity.names import InvalidName, WorkloadIdentity, validate_trust_domain

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


def is_label(text: str) -> bool:
    """RFC 1123 label as Kubernetes names use it, written without a regex."""
    return (
        1 <= len(text) <= 63
        and all(c in ALNUM or c == "-" for c in text)
        and text[0] != "-"
        and text[-1] != "-"
    )


def is_trust_domain(text: str) -> bool:
    return len(text) <= 253 and all(is_label(label) for label in text.split("."))


# Names that are right or nearly right: valid labels, with what attackers and careless operators
# add (a newline from $'...' or a file, CR, NUL, ESC, spaces, upper case, Unicode look-alikes).
labels = st.text(ALNUM + "-", min_size=1, max_size=12)
junk = st.sampled_from(
    [
        "",
        "\n",
        "\r\n",
        "\r",
        "\x00",
        "\x1b[31m",
        " ",
        "\t",
        "\u2028",
        "\x85",
        "A",
        "é",
        "\uff53",
        ".",
        "/",
        "-",
    ]
)


@st.composite
def nearly(draw: st.DrawFn, parts: int = 1, sep: str = ".") -> str:
    text = sep.join(draw(labels) for _ in range(draw(st.integers(1, parts))))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(junk) + text[i:]
    return text + draw(junk)


any_text = st.text(max_size=80) | nearly(parts=4)


@given(any_text)
def test_a_trust_domain_is_refused_with_invalid_name_or_meets_the_spec(text: str) -> None:
    try:
        validate_trust_domain(text)
    except InvalidName:
        return
    assert is_trust_domain(text), repr(text)


@given(any_text | nearly(parts=2, sep="/"))
def test_an_identity_is_refused_with_invalid_name_or_meets_the_spec(text: str) -> None:
    try:
        identity = WorkloadIdentity.parse_short(text, "cluster.local")
    except InvalidName:
        return
    assert is_label(identity.namespace) and is_label(identity.name), repr(text)
    assert identity.short == text


@st.composite
def spiffe_ids(draw: st.DrawFn) -> str:
    td, ns, sa = draw(nearly(parts=3)), draw(nearly()), draw(nearly())
    return (
        draw(st.sampled_from(["spiffe://", "spiffe://", "SPIFFE://", "spiffe:/"])) + f"{td}/ns/{ns}/sa/{sa}"
    )


@given(any_text | spiffe_ids())
def test_a_spiffe_id_is_refused_with_invalid_name_or_prints_back_as_read(text: str) -> None:
    try:
        identity = WorkloadIdentity.from_spiffe_id(text)
    except InvalidName:
        return
    assert identity.spiffe_id == text, repr(text)
    assert is_trust_domain(identity.trust_domain), repr(text)
    assert is_label(identity.namespace) and is_label(identity.name), repr(text)


@given(st.text(max_size=80), st.text(max_size=80), st.text(max_size=80), st.text(max_size=20))
def test_construction_raises_nothing_but_invalid_name(td: str, ns: str, name: str, mesh: str) -> None:
    try:
        identity = WorkloadIdentity(td, ns, name, mesh)
    except InvalidName as exc:
        assert exc.code == "invalid_name" and exc.message
        return
    assert is_trust_domain(td) and is_label(ns) and is_label(name) and is_label(mesh), repr(identity)
    assert WorkloadIdentity.from_spiffe_id(identity.spiffe_id, mesh) == identity


@pytest.mark.parametrize(
    "text", ["cluster.local\n", "shop/billing\n", "spiffe://cluster.local/ns/shop/sa/billing\n"]
)
def test_a_trailing_newline_is_refused(text: str) -> None:
    with pytest.raises(InvalidName):
        if text.startswith("spiffe://"):
            WorkloadIdentity.from_spiffe_id(text)
        elif "/" in text:
            WorkloadIdentity.parse_short(text, "cluster.local")
        else:
            validate_trust_domain(text)
