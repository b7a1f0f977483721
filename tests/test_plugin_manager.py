"""The plugin manager with real entry points.

Each test installs real distributions into a temporary directory (``NAME-1.0.dist-info/METADATA`` and
``entry_points.txt`` next to the plugin modules) and puts it on ``sys.path``; ``importlib.metadata``
discovers them exactly as it discovers pip-installed packages. Nothing of ``importlib.metadata`` is
mocked.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pluggy
import pytest

from qlm_plugin import hooks as qlm_hooks
from qlm_plugin.adapters.sim.engine import SimInstance
from qlm_plugin.domain.instance import InstanceState
from qlm_plugin.domain.request import Request, make_request
from qlm_plugin.policies import registry as policies_registry
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.stack import LocalStack, run_with_stack
from qlm_plugin.tools.simulate import run_policy
from qlm_plugin.transport.client import CoordinatorClient
from qlm_plugin.workloads.scenario import load_scenario

# Not ``from qlm_plugin.hooks import ...``: ruff resolves that path on disk (hooks/ lives at the repo
# root, mapped by setuptools) and sorts it as third-party.
DISABLE_AUTOLOAD_ENV = qlm_hooks.DISABLE_AUTOLOAD_ENV
PLUGINS_ALLOWLIST_ENV = qlm_hooks.PLUGINS_ALLOWLIST_ENV
ENTRY_POINT_GROUP = qlm_hooks.ENTRY_POINT_GROUP
get_plugin_manager = qlm_hooks.get_plugin_manager
hookimpl = qlm_hooks.hookimpl
load_entrypoint_plugins = qlm_hooks.manager.load_entrypoint_plugins
list_instances = qlm_hooks.list_instances
ADAPTERS_ENV = qlm_hooks.ADAPTERS_ENV
policy_registry = policies_registry.policy_registry

BUILTINS = {"qlm-defaults", "qlm-baselines"}
BUILTIN_POLICIES = ["fcfs", "edf", "edf-shed", "priority", "qlm", "oracle", "qlm-engine"]
MANAGER_LOGGER = "qlm_plugin.hooks.manager"
REPO_ROOT = Path(__file__).resolve().parents[1]

# --- plugin module sources -------------------------------------------------------------------------

RANK_PLUGIN = """
from qlm_plugin.hooks import hookimpl


class RankPlugin:
    @hookimpl
    def qlm_rank_key(self, request, instance_id, now):
        return ({tag!r}, request.prompt_tokens)


plugin = RankPlugin()
"""

# A module that is itself the plugin (entry point without ``:attr``).
MODULE_PLUGIN = """
from qlm_plugin.hooks import hookimpl


@hookimpl
def qlm_rank_key(request, instance_id, now):
    return ("module", request.id)
"""

# Answers only for instance "mine"; None elsewhere, so the next implementation is asked.
PARTIAL_RANK_PLUGIN = """
from qlm_plugin.hooks import hookimpl


class Partial:
    @hookimpl
    def qlm_rank_key(self, request, instance_id, now):
        return ("partial",) if instance_id == "mine" else None


plugin = Partial()
"""

RAISING_PLUGIN = """
raise RuntimeError("plugin import exploded")
"""

POLICY_PLUGIN = """
from qlm_plugin.hooks import hookimpl


class Ordering:
    @hookimpl
    def qlm_rank_key(self, request, instance_id, now):
        return (request.prompt_tokens, request.arrival_time, request.id)


class AddsPolicies:
    @hookimpl
    def qlm_add_policies(self, registry):
        for name in {names!r}:
            registry.add(name, lambda ctx: Ordering(), "shortest prompt first (test plugin)")


plugin = AddsPolicies()
"""

# ``qlm_add_policies`` is valid; ``qlm_rank_key`` names an argument the spec does not have.
WRONG_ARG_PLUGIN = """
from qlm_plugin.hooks import hookimpl


class WrongArg:
    @hookimpl
    def qlm_add_policies(self, registry):
        registry.add("ghost", lambda ctx: WrongArg(), "must never be listed")

    @hookimpl
    def qlm_rank_key(self, request, instance, now):
        return (0,)


plugin = WrongArg()
"""


TOY_ADAPTER = """
import time

from qlm_plugin.hooks import hookimpl
from qlm_plugin.domain.instance import InstanceInfo, InstanceState


class ToyBackend:
    \"\"\"An installed adapter with an instance that accepts work and never runs it (no loop drives
    it in the runs below).\"\"\"

    def __init__(self):
        self.dispatched = []

    @hookimpl
    def qlm_list_instances(self):
        return [InstanceInfo("toy-0", "toy", "h100", frozenset())]

    @hookimpl
    def qlm_instance_state(self, instance_id, detail):
        if instance_id != "toy-0":
            return None
        # idle, with every seat free: the most attractive instance of all
        models = ("llama-3.1-8b",)
        return InstanceState("toy-0", "toy", time.time(), models, (), None, 0, 0, 0, 0, 0, 100_000, 256)

    @hookimpl
    def qlm_dispatch(self, instance_id, request):
        if instance_id != "toy-0":
            return None
        self.dispatched.append(request.id)
        return True


plugin = ToyBackend()
"""


# --- fixtures --------------------------------------------------------------------------------------


class Site:
    """A directory on ``sys.path`` into which tests install distributions with ``qlm`` entry points."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: set[str] = set()

    def install(self, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        """Install distribution ``dist`` 1.0 with ``entry_points`` (name -> ``module[:attr]``, in this
        order) in the ``qlm`` group and the given top-level modules (name -> source).

        Install everything before the first discovery: on Python 3.11 ``importlib.invalidate_caches()``
        does not reset importlib.metadata's directory cache, which is keyed by the folder's mtime.
        """
        for module, source in modules.items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source).lstrip())
            self.modules.add(module)
        # Installers escape the name in the folder ("my-plugin" -> "my_plugin-1.0.dist-info"):
        # importlib.metadata takes the name up to the first "-".
        info = self.root / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{name} = {value}" for name, value in entry_points.items())]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        importlib.invalidate_caches()

    def install_rank_plugins(self, *names: str) -> None:
        """One distribution per name, each with a RankPlugin whose key starts with the name."""
        for name in names:
            module = f"qlmtest_{name.replace('-', '_')}"
            self.install(
                f"qlmtest-{name}", {name: f"{module}:plugin"}, {module: RANK_PLUGIN.format(tag=name)}
            )


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(PLUGINS_ALLOWLIST_ENV, raising=False)
    root = tmp_path / "site-packages"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    s = Site(root)
    yield s
    for module in s.modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


@pytest.fixture
def request_() -> Request:
    return make_request("r1", "llama-3.1-8b", prompt_tokens=512, max_tokens=128, arrival_time=3.0)


def plugin_names(pm: pluggy.PluginManager) -> set[str]:
    return {name for name, _ in pm.list_name_plugin()}


def manager_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == MANAGER_LOGGER and r.levelno >= logging.ERROR]


# --- discovery and precedence ----------------------------------------------------------------------


def test_entry_point_plugin_is_registered_and_overrides_default_rank_key(
    site: Site, request_: Request
) -> None:
    site.install_rank_plugins("good")

    baseline = get_plugin_manager(autoload=False)
    assert baseline.hook.qlm_rank_key(request=request_, instance_id="i0", now=5.0) == (3.0, "r1")

    pm = get_plugin_manager()
    assert pm.has_plugin("good")
    assert plugin_names(pm) >= BUILTINS
    assert type(pm.get_plugin("good")).__name__ == "RankPlugin"
    assert pm.hook.qlm_rank_key(request=request_, instance_id="i0", now=5.0) == ("good", 512)


def test_module_entry_point_is_registered_as_a_plugin(site: Site, request_: Request) -> None:
    site.install(
        "qlmtest-modplugin", {"modplugin": "qlmtest_modplugin"}, {"qlmtest_modplugin": MODULE_PLUGIN}
    )
    pm = get_plugin_manager()
    assert pm.get_plugin("modplugin") is sys.modules["qlmtest_modplugin"]
    assert pm.hook.qlm_rank_key(request=request_, instance_id="i0", now=0.0) == ("module", "r1")


def test_later_registered_firstresult_implementation_wins(site: Site, request_: Request) -> None:
    # One distribution, entry points registered in file order: "second" is registered last.
    site.install(
        "qlmtest-order",
        {"first": "qlmtest_first:plugin", "second": "qlmtest_second:plugin"},
        {
            "qlmtest_first": RANK_PLUGIN.format(tag="first"),
            "qlmtest_second": RANK_PLUGIN.format(tag="second"),
        },
    )
    pm = get_plugin_manager(autoload=False)
    assert load_entrypoint_plugins(pm) == ["first", "second"]
    assert pm.hook.qlm_rank_key(request=request_, instance_id="i0", now=0.0) == ("second", 512)


def test_plugin_returning_none_defers_to_the_next_implementation(site: Site, request_: Request) -> None:
    site.install(
        "qlmtest-partial", {"partial": "qlmtest_partial:plugin"}, {"qlmtest_partial": PARTIAL_RANK_PLUGIN}
    )
    pm = get_plugin_manager()
    assert pm.hook.qlm_rank_key(request=request_, instance_id="mine", now=0.0) == ("partial",)
    # Not its instance: falls through to the built-in default (arrival, id).
    assert pm.hook.qlm_rank_key(request=request_, instance_id="other", now=0.0) == (3.0, "r1")


def test_loading_twice_registers_nothing_new(site: Site) -> None:
    site.install_rank_plugins("good")
    pm = get_plugin_manager()
    assert pm.has_plugin("good")
    assert load_entrypoint_plugins(pm) == []


# --- broken plugins --------------------------------------------------------------------------------


def test_broken_plugins_are_logged_and_skipped(
    site: Site, request_: Request, caplog: pytest.LogCaptureFixture
) -> None:
    site.install(
        "qlmtest-mixed",
        {
            "explodes": "qlmtest_explodes:plugin",
            "noattr": "qlmtest_noattr:does_not_exist",
            "good": "qlmtest_good:plugin",
        },
        {
            "qlmtest_explodes": RAISING_PLUGIN,
            "qlmtest_noattr": RANK_PLUGIN.format(tag="noattr"),
            "qlmtest_good": RANK_PLUGIN.format(tag="good"),
        },
    )
    caplog.set_level(logging.DEBUG, logger=MANAGER_LOGGER)
    pm = get_plugin_manager(autoload=False)

    assert load_entrypoint_plugins(pm) == ["good"]

    assert not pm.has_plugin("explodes")
    assert not pm.has_plugin("noattr")
    assert plugin_names(pm) == BUILTINS | {"good"}
    assert pm.hook.qlm_rank_key(request=request_, instance_id="i0", now=0.0) == ("good", 512)

    errors = manager_errors(caplog)
    by_plugin = {
        name: [r for r in errors if repr(name) in r.getMessage()] for name in ("explodes", "noattr", "good")
    }
    assert len(by_plugin["explodes"]) == 1
    assert len(by_plugin["noattr"]) == 1
    assert by_plugin["good"] == []
    explodes, noattr = by_plugin["explodes"][0], by_plugin["noattr"][0]
    assert "skipped" in explodes.getMessage()
    assert "qlmtest_explodes:plugin" in explodes.getMessage()
    assert explodes.exc_info is not None and isinstance(explodes.exc_info[1], RuntimeError)
    assert "qlmtest_noattr:does_not_exist" in noattr.getMessage()
    assert noattr.exc_info is not None and isinstance(noattr.exc_info[1], AttributeError)


def test_a_plugin_that_fails_to_configure_is_logged_and_the_run_goes_on(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """Unguarded, a raise in ``qlm_configure`` stopped whatever configured it: inside vLLM, the
    engine at start (docs/vllm.md: a plugin that raises in any hook is logged and left out)."""
    site.install(
        "qlmtest-unconfigurable",
        {"unconfigurable": "qlmtest_unconfigurable:plugin"},
        {
            "qlmtest_unconfigurable": """
                from qlm_plugin.hooks import hookimpl

                class Unconfigurable:
                    @hookimpl
                    def qlm_configure(self, pm):
                        raise RuntimeError("bad plugin configure")

                plugin = Unconfigurable()
            """
        },
    )
    from qlm_plugin.adapters.vllm.engine_brain import EngineBrain

    brain = EngineBrain("tiny", "engine-0")  # the engine's own plugin manager: autoloaded
    assert brain.pm.has_plugin("unconfigurable")
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("'unconfigurable'" in m and "bad plugin configure" in m and "qlm_configure" in m for m in said)


def test_broken_plugin_does_not_break_get_plugin_manager(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    site.install(
        "qlmtest-explodes", {"explodes": "qlmtest_explodes:plugin"}, {"qlmtest_explodes": RAISING_PLUGIN}
    )
    site.install_rank_plugins("good")
    caplog.set_level(logging.DEBUG, logger=MANAGER_LOGGER)
    pm = get_plugin_manager()
    assert pm.has_plugin("good")
    assert not pm.has_plugin("explodes")
    assert any("'explodes'" in r.getMessage() for r in manager_errors(caplog))


# --- autoload switches -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "TRUE", " Yes "])
def test_disable_env_loads_no_entry_point_plugin(
    site: Site, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    site.install_rank_plugins("good")
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, value)
    pm = get_plugin_manager()
    assert plugin_names(pm) == BUILTINS
    assert policy_registry(pm).names() == BUILTIN_POLICIES


@pytest.mark.parametrize("value", ["", "0", "false", "no", "off"])
def test_other_disable_env_values_still_autoload(
    site: Site, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    site.install_rank_plugins("good")
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, value)
    assert get_plugin_manager().has_plugin("good")


def test_disable_env_wins_over_allow_list(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    site.install_rank_plugins("good")
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    monkeypatch.setenv(PLUGINS_ALLOWLIST_ENV, "good")
    assert plugin_names(get_plugin_manager()) == BUILTINS


def test_autoload_false_loads_no_entry_point_plugin(site: Site) -> None:
    site.install_rank_plugins("good")
    pm = get_plugin_manager(autoload=False)
    assert plugin_names(pm) == BUILTINS
    assert policy_registry(pm).names() == BUILTIN_POLICIES


@pytest.mark.parametrize("allow", ["a,b", " a , b ,", "b,a,unknown"])
def test_allow_list_loads_only_the_named_plugins(
    site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, allow: str
) -> None:
    site.install_rank_plugins("a", "b", "c")
    monkeypatch.setenv(PLUGINS_ALLOWLIST_ENV, allow)
    caplog.set_level(logging.DEBUG, logger=MANAGER_LOGGER)
    pm = get_plugin_manager()
    assert plugin_names(pm) == BUILTINS | {"a", "b"}
    assert manager_errors(caplog) == []


# --- policies contributed by plugins ---------------------------------------------------------------


def test_plugin_policy_is_listed_after_the_builtins(site: Site, request_: Request) -> None:
    site.install(
        "qlmtest-policies",
        {"policies": "qlmtest_policies:plugin"},
        {"qlmtest_policies": POLICY_PLUGIN.format(names=["spf"])},
    )
    pm = get_plugin_manager()
    registry = policy_registry(pm)
    assert registry.names() == [*BUILTIN_POLICIES, "spf"]
    info = registry.get("spf")
    assert info.reference is False
    policy = info.factory(policies_registry.PolicyContext())
    assert policy.qlm_rank_key(request_, "i0", 0.0) == (512, 3.0, "r1")


def test_builtin_policies_lead_whatever_the_plugin_order(site: Site) -> None:
    site.install(
        "qlmtest-policies",
        {
            "p1": "qlmtest_p1:plugin",
            "p2": "qlmtest_p2:plugin",
        },
        {
            "qlmtest_p1": POLICY_PLUGIN.format(names=["one", "uno"]),
            "qlmtest_p2": POLICY_PLUGIN.format(names=["two"]),
        },
    )
    names = policy_registry(get_plugin_manager()).names()
    assert names[: len(BUILTIN_POLICIES)] == BUILTIN_POLICIES
    assert sorted(names[len(BUILTIN_POLICIES) :]) == ["one", "two", "uno"]
    assert names.index("one") < names.index("uno")  # a plugin's own policies keep their order


@pytest.mark.parametrize("duplicate", BUILTIN_POLICIES)
def test_plugin_policy_duplicating_a_builtin_name_is_logged_and_skipped(
    site: Site, duplicate: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every command builds the registry: a plugin taking a built-in's name must not stop them all
    (it did, with an error that did not name the plugin), nor replace the built-in."""
    site.install(
        "qlmtest-dup",
        {"dup": "qlmtest_dup:plugin"},
        {"qlmtest_dup": POLICY_PLUGIN.format(names=[duplicate])},
    )
    registry = policy_registry(get_plugin_manager())
    assert registry.names(ablations=True).count(duplicate) == 1
    assert "test plugin" not in registry.get(duplicate).description
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "'dup'" in error and f"policy '{duplicate}' is already registered" in error


def test_two_plugins_adding_the_same_policy_name_keep_one(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    site.install(
        "qlmtest-dup",
        {"dup1": "qlmtest_dup1:plugin", "dup2": "qlmtest_dup2:plugin"},
        {
            "qlmtest_dup1": POLICY_PLUGIN.format(names=["same"]),
            "qlmtest_dup2": POLICY_PLUGIN.format(names=["same"]),
        },
    )
    assert "same" in policy_registry(get_plugin_manager())
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "policy 'same' is already registered" in error


def test_a_plugin_whose_add_policies_raises_leaves_the_others(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    site.install(
        "qlmtest-addraises",
        {"raises": "qlmtest_addraises:plugin", "good": "qlmtest_good:plugin"},
        {
            "qlmtest_addraises": "from qlm_plugin.hooks import hookimpl\n\n\n"
            "class Raises:\n"
            "    @hookimpl\n"
            "    def qlm_add_policies(self, registry):\n"
            "        raise RuntimeError('add_policies boom')\n\n\n"
            "plugin = Raises()\n",
            "qlmtest_good": POLICY_PLUGIN.format(names=["spf"]),
        },
    )
    registry = policy_registry(get_plugin_manager())
    assert "spf" in registry and all(name in registry for name in BUILTIN_POLICIES)
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "'raises'" in error and "add_policies boom" in error


# --- hook validation -------------------------------------------------------------------------------


class WrongArgName:
    @hookimpl
    def qlm_rank_key(self, request: Request, instance: str, now: float) -> tuple[int]:
        return (0,)


class UnknownQlmHook:
    @hookimpl
    def qlm_rank_keys(self, request: Request) -> tuple[int]:  # typo: no such hookspec
        return (0,)


def test_wrong_argument_name_is_rejected_at_registration() -> None:
    pm = get_plugin_manager(autoload=False)
    with pytest.raises(pluggy.PluginValidationError, match="instance"):
        pm.register(WrongArgName(), name="wrong")


def test_unknown_hook_name_is_caught_by_check_pending() -> None:
    pm = get_plugin_manager(autoload=False)
    pm.register(UnknownQlmHook(), name="typo")
    with pytest.raises(pluggy.PluginValidationError, match="qlm_rank_keys"):
        pm.check_pending()


def test_wrong_argument_name_from_entry_point_is_logged_not_raised(
    site: Site, request_: Request, caplog: pytest.LogCaptureFixture
) -> None:
    site.install(
        "qlmtest-wrongarg",
        {"wrongarg": "qlmtest_wrongarg:plugin", "good": "qlmtest_good:plugin"},
        {"qlmtest_wrongarg": WRONG_ARG_PLUGIN, "qlmtest_good": RANK_PLUGIN.format(tag="good")},
    )
    caplog.set_level(logging.DEBUG, logger=MANAGER_LOGGER)
    pm = get_plugin_manager(autoload=False)

    assert load_entrypoint_plugins(pm) == ["good"]  # no crash; the bad one is not reported as loaded

    assert pm.hook.qlm_rank_key(request=request_, instance_id="i0", now=0.0) == ("good", 512)
    errors = [r for r in manager_errors(caplog) if "'wrongarg'" in r.getMessage()]
    assert len(errors) == 1
    assert "skipped" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], pluggy.PluginValidationError)


def test_plugin_rejected_by_validation_leaves_nothing_registered(site: Site) -> None:
    site.install(
        "qlmtest-wrongarg", {"wrongarg": "qlmtest_wrongarg:plugin"}, {"qlmtest_wrongarg": WRONG_ARG_PLUGIN}
    )
    pm = get_plugin_manager()
    assert "ghost" not in policy_registry(pm).names()  # its valid qlm_add_policies must not run
    assert not pm.has_plugin("wrongarg")


def test_an_entry_point_naming_a_class_registers_an_instance_of_it(site: Site, request_: Request) -> None:
    """``spf = module:ShortestPromptFirst``: its hooks are methods; registered as the class, every
    call raised for the missing ``self``."""
    site.install(
        "qlmtest-classplugin",
        {"classplugin": "qlmtest_classplugin:RankPlugin"},
        {"qlmtest_classplugin": RANK_PLUGIN.format(tag="class")},
    )
    pm = get_plugin_manager()
    assert type(pm.get_plugin("classplugin")).__name__ == "RankPlugin"
    assert pm.hook.qlm_rank_key(request=request_, instance_id="i0", now=0.0) == ("class", 512)


def test_a_plugin_with_a_misspelled_hook_is_logged_and_skipped(
    site: Site, request_: Request, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook no spec declares would never be called: the plugin is not half-loaded without it."""
    typo = RANK_PLUGIN.format(tag="typo").replace("def qlm_rank_key(", "def qlm_rank_kye(")
    site.install("qlmtest-typo", {"typo": "qlmtest_typo:plugin"}, {"qlmtest_typo": typo})
    caplog.set_level(logging.DEBUG, logger=MANAGER_LOGGER)
    pm = get_plugin_manager(autoload=False)
    assert load_entrypoint_plugins(pm) == []
    assert not pm.has_plugin("typo")
    (error,) = [r for r in manager_errors(caplog) if "'typo'" in r.getMessage()]
    assert "hooks that do not exist: qlm_rank_kye" in error.getMessage()
    pm.check_pending()  # nothing of it is left


# --- import hygiene --------------------------------------------------------------------------------


def test_importing_the_package_installs_no_top_level_hooks_or_adapters(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import importlib.util, os, sys
        repo = os.path.realpath({str(REPO_ROOT)!r})
        on_path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) == repo]
        assert not on_path, f"repo root on sys.path: {{on_path}}"

        import qlm_plugin.hooks, qlm_plugin.adapters.sim

        assert qlm_plugin.hooks.get_plugin_manager is not None
        assert "hooks" not in sys.modules, sys.modules.get("hooks")
        assert "adapters" not in sys.modules, sys.modules.get("adapters")
        for name in ("hooks", "adapters"):
            spec = importlib.util.find_spec(name)
            assert spec is None, f"top-level {{name!r}} importable: {{spec}}"

        # Control: the check does see the repo's folders once the repo root is on sys.path.
        sys.path.insert(0, repo)
        importlib.invalidate_caches()
        assert importlib.util.find_spec("hooks") is not None
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"}}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- installed adapters serve only the runs that ask for them ---------------------------------------


def test_an_installed_adapter_adopts_no_instance_in_a_run_that_did_not_ask_for_it(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ADAPTERS_ENV, raising=False)
    site.install("qlmtest-toy", {"toy": "qlmtest_toy:plugin"}, {"qlmtest_toy": TOY_ADAPTER})
    pm = get_plugin_manager()
    assert pm.has_plugin("toy") and "toy" in pm.idle_adapters
    assert [i.instance_id for i in list_instances(pm)] == []
    assert [i.instance_id for i in list_instances(get_plugin_manager(adapters=["toy"]))] == ["toy-0"]
    monkeypatch.setenv(ADAPTERS_ENV, "other,toy")
    assert [i.instance_id for i in list_instances(get_plugin_manager())] == ["toy-0"]
    monkeypatch.delenv(ADAPTERS_ENV)

    # A whole simulation with the adapter installed: QLM serves every request on the simulated
    # instances, none is handed to the toy engine that nothing drives.
    scenario = load_scenario()
    requests = [
        make_request(f"r{k}", "llama-3.1-8b", prompt_tokens=200, max_tokens=32, arrival_time=k * 0.05)
        for k in range(40)
    ]
    result = run_policy(scenario, "qlm", requests)
    toy = sys.modules["qlmtest_toy"].plugin
    assert toy.dispatched == []
    assert result.overall.finished == len(requests), result.overall


# --- installed plugins in every run, guarded -------------------------------------------------------

COUNTING_RANK_PLUGIN = """
from qlm_plugin.hooks import hookimpl

calls = []


class ShortestPromptFirst:
    @hookimpl
    def qlm_rank_key(self, request, instance_id, now):
        calls.append(request.id)
        return (request.prompt_tokens, request.arrival_time, request.id)


plugin = ShortestPromptFirst()
"""

# Each hook answers something its contract rules out, or raises.
BAD_ANSWERS_PLUGIN = """
from qlm_plugin.hooks import hookimpl
from qlm_plugin.domain.distributions import LengthDistribution
from qlm_plugin.domain.outcome import Admission


class Bad:
    @hookimpl
    def qlm_rank_key(self, request, instance_id, now):
        return float("nan")

    @hookimpl
    def qlm_predict_output_length(self, request, generated_tokens):
        return LengthDistribution(mean=1e9, var=0.0)

    @hookimpl
    def qlm_admit(self, request, estimate, now):
        return Admission("someone-else", accepted=False, can_meet_slo=False)

    @hookimpl
    def qlm_select_victim(self, candidates, instance_id, now):
        raise RuntimeError("victim exploded")


plugin = Bad()
"""


ZERO_THEN_PROMPT_PLUGIN = """
from qlm_plugin.hooks import hookimpl


class ShortestPromptFirst:
    @hookimpl
    def qlm_rank_key(self, request, instance_id, now):
        return (0, (request.prompt_tokens,), request.id)


plugin = ShortestPromptFirst()
"""


def small_run(n: int = 40) -> list[Request]:
    return [
        make_request(
            f"r{k}", "llama-3.1-8b", prompt_tokens=100 + 37 * (k % 7), max_tokens=32, arrival_time=k * 0.02
        )
        for k in range(n)
    ]


@pytest.mark.parametrize("policy", ["fcfs", "qlm"])
def test_an_installed_plugin_overrides_the_runs_policy(site: Site, request_: Request, policy: str) -> None:
    """The README's plugin, installed, changed nothing in ``qlm simulate`` or ``qlm serve``: the
    run's policy, registered after it, answered first. Installed plugins now come before the run's
    policy everywhere (as inside vLLM), and the policy before the built-in fallbacks."""
    site.install("qlmtest-spf", {"spf": "qlmtest_spf:plugin"}, {"qlmtest_spf": COUNTING_RANK_PLUGIN})
    pm = get_plugin_manager()
    pm.register(
        type("Fcfs", (), {"qlm_rank_key": hookimpl(lambda self, request, instance_id, now: (0.0,))})(),
        name="policy:fcfs:0",
    )
    assert pm.hook.qlm_rank_key(request=request_, instance_id="i0", now=0.0) == (512, 3.0, "r1")
    pm.unregister(name="spf")
    assert pm.hook.qlm_rank_key(request=request_, instance_id="i0", now=0.0) == (0.0,)  # above the default

    result = run_policy(load_scenario(), policy, small_run())
    assert result.overall.finished == 40, result.overall
    assert sys.modules["qlmtest_spf"].calls, f"the installed plugin was never asked under {policy}"


# Answers for some requests only: the others get the run's policy's key (a tuple), beside its ints.
SOME_RANK_PLUGIN = """
from qlm_plugin.hooks import hookimpl


class LongPromptsByLength:
    @hookimpl
    def qlm_rank_key(self, request, instance_id, now):
        return request.prompt_tokens if request.prompt_tokens > 200 else None


plugin = LongPromptsByLength()
"""


@pytest.mark.parametrize("policy", ["fcfs", "qlm"])
def test_a_plugin_ranking_some_requests_only_does_not_break_the_simulated_engines(
    site: Site, policy: str
) -> None:
    """The simulated engines ordered their queue by the bare keys, so an int beside the policy's
    tuple raised TypeError out of ``qlm simulate``; vLLM's scheduler already compared them safely.
    A burst, so that the engine's queue holds both kinds at once."""
    site.install("qlmtest-some", {"some": "qlmtest_some:plugin"}, {"qlmtest_some": SOME_RANK_PLUGIN})
    burst = [replace(r, arrival_time=0.0) for r in small_run()]
    result = run_policy(load_scenario(), policy, burst)
    assert result.overall.finished == 40, result.overall
    assert sorted(o.request.id for o in result.outcomes) == sorted(r.id for r in burst)


def test_a_plugin_answering_what_its_hook_rules_out_is_logged_once_and_the_next_answer_used(
    site: Site, request_: Request, caplog: pytest.LogCaptureFixture
) -> None:
    """A NaN rank key, a length past max_tokens, another request's admission, a raising victim
    choice: each crashed ``qlm simulate`` or was used as is. Each is now dropped, logged once
    naming the plugin and the hook, and the next implementation answers."""
    site.install("qlmtest-bad", {"bad": "qlmtest_bad:plugin"}, {"qlmtest_bad": BAD_ANSWERS_PLUGIN})
    pm = get_plugin_manager()
    for _ in range(3):
        assert pm.hook.qlm_rank_key(request=request_, instance_id="i0", now=5.0) == (3.0, "r1")
    assert pm.hook.qlm_predict_output_length(request=request_, generated_tokens=0) is None or (
        pm.hook.qlm_predict_output_length(request=request_, generated_tokens=0).mean <= request_.max_tokens
    )
    assert pm.guard.failures[("bad", "qlm_rank_key")] == 3
    logged = [r.getMessage() for r in caplog.records if "'bad'" in r.getMessage()]
    assert len([m for m in logged if "qlm_rank_key" in m]) == 1, logged
    assert any("qlm_predict_output_length" in m and "max_tokens" in m for m in logged), logged

    caplog.clear()
    result = run_policy(load_scenario(), "qlm", small_run())  # the whole run goes through
    assert result.overall.finished == 40, result.overall
    assert any("someone-else" in r.getMessage() for r in caplog.records)


# Each hook takes a subset of its spec's arguments, as pluggy allows (and docs/adapters.md says).
SUBSET_ARGS_PLUGIN = """
import numpy as np
from qlm_plugin.hooks import hookimpl
from qlm_plugin.domain.distributions import LengthDistribution
from qlm_plugin.domain.outcome import Admission


class Subset:
    @hookimpl
    def qlm_predict_output_length(self, request):
        return LengthDistribution(mean=min(7.0, request.max_tokens), var=1.0)

    @hookimpl
    def qlm_admit(self, request):
        return Admission(request.id, accepted=True, can_meet_slo=True)

    @hookimpl
    def qlm_choose_instance(self, instances):
        return instances[-1].instance_id

    @hookimpl
    def qlm_rank_key(self, request):
        # an "interactive first" key: a bool, then numpy's numbers
        return (request.slo.ttft_deadline is None, np.int64(request.prompt_tokens), np.float32(1.5))


plugin = Subset()
"""


def test_a_plugin_taking_a_subset_of_the_arguments_is_checked_and_used(
    site: Site, request_: Request, caplog: pytest.LogCaptureFixture
) -> None:
    """The guard's checks read every argument of the spec, but pluggy passes an implementation
    only those it names: a hook taking a subset raised KeyError out of ``qlm simulate`` and turned
    every request of ``qlm serve`` into a 500. And keys of bools and numpy's numbers, real numbers
    all, were refused as "not a number"."""
    site.install(
        "qlmtest-subset", {"subset": "qlmtest_subset:plugin"}, {"qlmtest_subset": SUBSET_ARGS_PLUGIN}
    )
    pm = get_plugin_manager()
    dist = pm.hook.qlm_predict_output_length(request=request_, generated_tokens=0)
    assert dist is not None and dist.mean == 7.0
    key = pm.hook.qlm_rank_key(request=request_, instance_id="i0", now=0.0)
    assert key == (request_.slo.ttft_deadline is None, 512, 1.5)
    states = [InstanceState(f"i{k}", "sim", 0.0, ("m",), (), None, 0, 0, 0, 0, 0, 100, 4) for k in range(2)]
    assert pm.hook.qlm_choose_instance(request=request_, instances=states, now=0.0) == "i1"
    verdict = pm.hook.qlm_admit(request=request_, estimate=None, now=0.0)
    assert verdict is not None and verdict.request_id == request_.id
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not pm.guard.failures
    # its answer is still checked against the arguments it did not take
    assert pm.hook.qlm_predict_output_length(request=request_, generated_tokens=request_.max_tokens) is None
    assert pm.guard.failures == {("subset", "qlm_predict_output_length"): 1}

    result = run_policy(load_scenario(), "qlm", small_run())
    assert result.overall.finished == 40, result.overall


def test_a_broken_plugin_is_logged_once_per_process(
    site: Site, request_: Request, caplog: pytest.LogCaptureFixture
) -> None:
    """Each run builds plugin managers of its own (a simulation of two policies, every engine): the
    same broken hook was logged, with its traceback, once per manager."""
    site.install("qlmtest-bad", {"bad": "qlmtest_bad:plugin"}, {"qlmtest_bad": BAD_ANSWERS_PLUGIN})
    for _ in range(3):
        pm = get_plugin_manager()
        assert pm.hook.qlm_rank_key(request=request_, instance_id="i0", now=5.0) == (3.0, "r1")
        assert pm.guard.failures[("bad", "qlm_rank_key")] == 1
    logged = [r for r in caplog.records if "'bad'" in r.getMessage() and "qlm_rank_key" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]


def test_a_slow_plugin_is_named(
    site: Site, request_: Request, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.install("qlmtest-spf", {"spf": "qlmtest_spf:plugin"}, {"qlmtest_spf": COUNTING_RANK_PLUGIN})
    monkeypatch.setattr(qlm_hooks.guard, "SLOW_CALL_S", 0.0)
    pm = get_plugin_manager()
    for _ in range(2):
        assert pm.hook.qlm_rank_key(request=request_, instance_id="i0", now=0.0) == (512, 3.0, "r1")
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(slow) == 1 and "'spf'" in slow[0] and "qlm_rank_key" in slow[0], slow


def test_an_installed_rank_key_orders_a_coordinators_instance_by_its_whole_key(
    site: Site, tmp_path: Path
) -> None:
    """``qlm serve`` sent an instance only a rank key's first number: shortest-prompt-first keyed
    ``(0, prompt_tokens)`` ranked every request alike. The instance now gets the key's leading
    numbers, and serves its waiting requests in that order."""
    site.install("qlmtest-spf", {"spf": "qlmtest_spf:plugin"}, {"qlmtest_spf": ZERO_THEN_PROMPT_PLUGIN})
    scenario = load_scenario()
    model = scenario.models[0].name
    one_seat = SimInstance(
        "sim-0", "h100", scenario.cost_models_for("h100"), initial_model=model, max_num_seqs=1
    )

    async def body(st: LocalStack) -> None:
        # the order the instance starts them in (the coordinator's first-token times can tie: one
        # report may carry two requests' first tokens when the machine is loaded)
        started: list[str] = []
        told = one_seat.on_first_token
        one_seat.on_first_token = lambda o: (started.append(o.request.id), told(o))[1]
        async with CoordinatorClient(st.grpc_target) as c:
            blocker = await c.submit(pb.RequestSpec(model=model, prompt="hold the seat", max_tokens=400))
            while st.coordinator.jobs[blocker.request_id].tokens == 0:
                await asyncio.sleep(0.01)
            words = (400, 300, 200, 100)  # arriving longest first: fcfs serves them in this order
            ids = [
                (await c.submit(pb.RequestSpec(model=model, prompt="word " * n, max_tokens=4))).request_id
                for n in words
            ]
            for rid in ids:
                async for _ in c.stream(rid, timeout_s=60):
                    pass
            assert [r for r in started if r in ids] == ids[::-1], started  # shortest prompt first

    run_with_stack(tmp_path, body, instances=1, sims=[one_seat], config={"policy": "fcfs"})


REFUSE_BATCH_PLUGIN = """
from qlm_plugin.hooks import hookimpl
from qlm_plugin.domain.outcome import Admission


class NoBatch:
    @hookimpl
    def qlm_admit(self, request, estimate, now):
        if request.slo_class == "batch":
            return Admission(request.id, accepted=False, can_meet_slo=False, reason="no batch here")
        return None


plugin = NoBatch()
"""


def test_an_installed_admission_refuses_in_a_coordinator_as_in_the_simulator(
    site: Site, tmp_path: Path
) -> None:
    """A plugin's ``qlm_admit`` refused 400 of 400 requests in ``qlm simulate`` and none in ``qlm
    serve``: the front door compared only the estimate with a threshold. It now asks the plugin,
    before the journal, and the client is told its reason."""
    site.install(
        "qlmtest-nobatch", {"nobatch": "qlmtest_nobatch:plugin"}, {"qlmtest_nobatch": REFUSE_BATCH_PLUGIN}
    )
    model = load_scenario().models[0].name
    batch = pb.SLO(slo_class="batch")

    async def body(st: LocalStack) -> None:
        assert st.coordinator._plugin_admits
        async with CoordinatorClient(st.grpc_target) as c:
            refused = await c.submit(pb.RequestSpec(model=model, prompt="x", max_tokens=4, slo=batch))
            assert refused.code == "slo_unattainable" and "no batch here" in refused.reason, refused
            assert refused.request_id not in st.coordinator.jobs
            ok = await c.submit(pb.RequestSpec(model=model, prompt="x", max_tokens=4))
            async for _ in c.stream(ok.request_id, timeout_s=30):
                pass
            assert st.coordinator.jobs[ok.request_id].state == "finished"

    run_with_stack(tmp_path, body, instances=1, config={"policy": "qlm"})


def test_without_an_installed_admission_the_front_door_makes_no_estimate(tmp_path: Path) -> None:
    """(Asking for an estimate per request costs the front door: only a plugin's admission, a
    class's refusal threshold or ``reject_if_late`` asks for one.)"""

    async def body(st: LocalStack) -> None:
        assert not st.coordinator._plugin_admits

    run_with_stack(tmp_path, body, instances=1, config={"policy": "qlm"})


TICKING_PLUGIN = """
from qlm_plugin.hooks import hookimpl

ticks = []


class Ticks:
    @hookimpl
    def qlm_tick(self, now):
        ticks.append(now)
        return False


plugin = Ticks()
"""


def test_a_plugins_tick_runs_in_the_simulator_without_a_queue_manager(site: Site) -> None:
    """The coordinator's timer ticks every plugin under any policy; the simulator ticked only under
    a queue manager, so a plugin's periodic work ran in ``qlm serve`` and never in ``qlm simulate``."""
    site.install("qlmtest-ticks", {"ticks": "qlmtest_ticks:plugin"}, {"qlmtest_ticks": TICKING_PLUGIN})
    result = run_policy(load_scenario(), "fcfs", small_run())
    assert result.overall.finished == 40
    assert len(sys.modules["qlmtest_ticks"].ticks) > 1
