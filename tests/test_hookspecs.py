"""The hook specifications are the contract document: check the code says what the contract says.

Each hookspec must name itself ``qlm_*``, say how its results are combined (and agree with the marker
on ``firstresult``), and sit in its lifecycle section; backend hooks must be ``firstresult`` and tell
adapters to answer ``None`` for instances that are not theirs.
"""

from __future__ import annotations

import inspect
import re

import pluggy
import pytest

from qlm_plugin import hooks as qlm_hooks

# Not ``from qlm_plugin.hooks import ...``: ruff resolves that path on disk (hooks/ lives at the repo
# root, mapped by setuptools) and sorts it as third-party.
hookspecs = qlm_hooks.hookspecs
get_plugin_manager = qlm_hooks.get_plugin_manager

BACKEND_HOOKS = (
    "qlm_instance_state",
    "qlm_dispatch",
    "qlm_evict",
    "qlm_load_model",
)

#: Section banners of hookspecs.py, in lifecycle order (each banner title starts with one of these).
SECTIONS = ("Initialization", "Request lifecycle", "Fleet membership", "Policy hooks", "Backend hooks")

#: Which section each hook belongs to (hooks not listed are policy hooks).
SECTION_OF = {
    "qlm_add_policies": "Initialization",
    "qlm_configure": "Initialization",
    "qlm_tick": "Initialization",
    "qlm_stats": "Initialization",
    "qlm_submit": "Request lifecycle",
    "qlm_instance_ready": "Request lifecycle",
    "qlm_request_queued": "Request lifecycle",
    "qlm_request_finished": "Request lifecycle",
    "qlm_instance_joined": "Fleet membership",
    "qlm_instance_left": "Fleet membership",
    "qlm_operation_failed": "Fleet membership",
    "qlm_list_instances": "Backend hooks",
    **dict.fromkeys(BACKEND_HOOKS, "Backend hooks"),
}

ALL_CALLED = "All implementations are called"
FOREIGN_NONE = re.compile(r"``None`` if the instance is not this adapter's")


def _spec_names() -> list[str]:
    pm = pluggy.PluginManager("qlm")
    return sorted(
        name
        for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
        if pm.parse_hookspec_opts(hookspecs, name) is not None
    )


SPEC_NAMES = _spec_names()


def _doc(name: str) -> str:
    """The hookspec's docstring with whitespace collapsed (phrases may wrap over lines)."""
    return " ".join((inspect.getdoc(getattr(hookspecs, name)) or "").split())


@pytest.fixture(scope="module")
def pm() -> pluggy.PluginManager:
    return get_plugin_manager(autoload=False)


def test_spec_discovery_finds_the_known_hooks() -> None:
    # Guards the parametrizations below against silently testing nothing.
    assert len(SPEC_NAMES) >= 14
    assert set(BACKEND_HOOKS) | {"qlm_add_policies", "qlm_rank_key", "qlm_list_instances"} <= set(SPEC_NAMES)


def test_every_public_function_of_the_module_is_a_hookspec() -> None:
    public = {
        name
        for name, obj in vars(hookspecs).items()
        if inspect.isfunction(obj) and not name.startswith("_") and obj.__module__ == hookspecs.__name__
    }
    assert public == set(SPEC_NAMES)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_hookspec_is_named_qlm(name: str) -> None:
    assert name.startswith("qlm_")


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_hookspec_is_registered_on_the_manager(pm: pluggy.PluginManager, name: str) -> None:
    caller = getattr(pm.hook, name)
    assert caller.spec is not None
    assert caller.spec.function is getattr(hookspecs, name)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_hookspec_has_a_docstring(name: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, name))
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0].strip()
    assert len(summary) > 10, f"{name}: docstring has no summary line"


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_docstring_states_result_semantics_matching_the_marker(pm: pluggy.PluginManager, name: str) -> None:
    doc = _doc(name)
    firstresult = getattr(pm.hook, name).spec.opts["firstresult"]
    says_first = "firstresult" in doc
    says_all = ALL_CALLED in doc
    assert says_first or says_all, f"{name}: docstring states no result semantics"
    assert says_first != says_all, f"{name}: docstring claims both firstresult and all-called"
    assert says_first == firstresult, (
        f"{name}: marker firstresult={firstresult} but docstring says "
        f"{'firstresult' if says_first else ALL_CALLED!r}"
    )


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_no_hook_is_historic(pm: pluggy.PluginManager, name: str) -> None:
    assert getattr(pm.hook, name).spec.opts["historic"] is False


@pytest.mark.parametrize("name", BACKEND_HOOKS)
def test_backend_hook_is_firstresult(pm: pluggy.PluginManager, name: str) -> None:
    assert getattr(pm.hook, name).spec.opts["firstresult"] is True


@pytest.mark.parametrize("name", BACKEND_HOOKS)
def test_backend_hook_documents_none_for_a_foreign_instance(name: str) -> None:
    assert FOREIGN_NONE.search(_doc(name)), f"{name}: no 'None if the instance is not this adapter's'"


@pytest.mark.parametrize("name", BACKEND_HOOKS)
def test_backend_hook_is_addressed_by_instance_id(pm: pluggy.PluginManager, name: str) -> None:
    # The core asks adapters in turn for one instance_id; each hook must take it, first.
    assert getattr(pm.hook, name).spec.argnames[0] == "instance_id"


def test_module_docstring_states_the_backend_firstresult_rule() -> None:
    doc = " ".join((hookspecs.__doc__ or "").split())
    assert "backend hooks" in doc
    assert "returns ``None`` for an ``instance_id`` that is not its own" in doc


def test_spec_marker_is_private() -> None:
    assert "hookspec" not in qlm_hooks.__all__
    assert not hasattr(qlm_hooks, "hookspec")
    public_spec_markers = [
        f"{mod.__name__}.{name}"
        for mod in (qlm_hooks, hookspecs)
        for name, obj in vars(mod).items()
        if not name.startswith("_") and isinstance(obj, pluggy.HookspecMarker)
    ]
    assert public_spec_markers == []
    # The private marker exists and belongs to the same project as the public hookimpl marker.
    assert isinstance(hookspecs._hookspec, pluggy.HookspecMarker)
    assert hookspecs._hookspec.project_name == "qlm"


def test_public_hookimpl_marker_is_for_project_qlm(pm: pluggy.PluginManager) -> None:
    assert "hookimpl" in qlm_hooks.__all__
    assert isinstance(qlm_hooks.hookimpl, pluggy.HookimplMarker)
    assert qlm_hooks.hookimpl.project_name == "qlm"
    assert pm.project_name == "qlm"


def _sections() -> list[tuple[str, int]]:
    """(banner title, line number) of each ``# ----`` / ``# Title`` / ``# ----`` banner, in source order."""
    lines = inspect.getsource(hookspecs).splitlines()
    rule = re.compile(r"#\s*-{20,}\s*")
    banners = []
    for i in range(len(lines) - 2):
        if rule.fullmatch(lines[i]) and rule.fullmatch(lines[i + 2]) and not rule.fullmatch(lines[i + 1]):
            banners.append((lines[i + 1].lstrip("#").strip(), i + 2))  # 1-based line of the title
    return banners


def test_sections_appear_in_lifecycle_order() -> None:
    titles = [title for title, _ in _sections()]
    assert len(titles) == len(SECTIONS), titles
    for title, expected in zip(titles, SECTIONS, strict=True):
        assert title.startswith(expected), f"section {title!r} where {expected!r} was expected"


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_hookspec_sits_in_its_section(name: str) -> None:
    banners = _sections()
    _, def_line = inspect.getsourcelines(getattr(hookspecs, name))
    before = [title for title, line in banners if line < def_line]
    assert before, f"{name} is defined before the first section banner"
    expected = SECTION_OF.get(name, "Policy hooks")
    assert before[-1].startswith(expected), f"{name} is in section {before[-1]!r}, expected {expected!r}"
