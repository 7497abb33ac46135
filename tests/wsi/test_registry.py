"""The one registry pattern: unknown names list the choices, extras name their install."""

from __future__ import annotations

import pytest
from oncotrace import mil, spatial, wsi


def test_unknown_name_is_a_value_error_listing_the_choices() -> None:
    reg = wsi.Registry[int]("widget")
    reg.add("b", 2)
    reg.add("a", 1)
    assert reg.names() == ["a", "b"] and len(reg) == 2 and "a" in reg
    with pytest.raises(ValueError, match=r"unknown widget 'c'; choose one of \['a', 'b'\]"):
        reg.get("c")


def test_registering_a_name_twice_is_refused_unless_it_is_the_same_value() -> None:
    reg = wsi.Registry[object]("widget")
    value = object()
    reg.add("x", value)
    reg.add("x", value)  # idempotent: a module imported twice
    with pytest.raises(ValueError, match="already registered"):
        reg.add("x", object())
    with pytest.raises(ValueError, match="non-empty"):
        reg.add(" x", value)


def test_an_entry_for_an_extra_names_the_install_and_is_not_available() -> None:
    reg = wsi.Registry[str]("encoder")
    reg.add("plain", "p")
    reg.add("fancy", "f", requires=("json", "no_such_module_4711"), install="pip install fancy")
    assert reg.names() == ["fancy", "plain"]
    assert reg.names(available_only=True) == ["plain"]
    with pytest.raises(ImportError, match=r"needs no_such_module_4711.*Fix: pip install fancy"):
        reg.get("fancy")
    with pytest.raises(ValueError, match="say how to install"):
        reg.add("bad", "b", requires=("x",))
    reg.remove("fancy")
    assert reg.names() == ["plain"]


@pytest.mark.parametrize(
    ("registry", "known"),
    [(mil.ENCODERS, "pathomics"), (mil.HEADS, "abmil"), (spatial.CELL_DETECTORS, "classical")],
)
def test_every_stage_registry_is_the_shared_pattern(registry: wsi.Registry, known: str) -> None:
    assert isinstance(registry, wsi.Registry)
    assert known in registry.names()
    with pytest.raises(ValueError, match=f"unknown {registry.kind} 'nope'"):
        registry.get("nope")


def test_create_functions_reject_unknown_names_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown encoder 'nope'.*pathomics"):
        mil.create_encoder("nope")
    with pytest.raises(ValueError, match=r"unknown MIL head 'nope'.*abmil"):
        mil.create_head("nope", in_dims=4, tasks={"t": ["a", "b"]})
