"""The vLLM plugin's configuration (nixl_etcd.vllm.config): every variable the
plugin reads is checked at engine start (register()); a bad value is one clear
error naming the variable, the value and what is accepted; never a silent
default, never a silent stock mode. And ENV_VARS declares every VLLM_NIXL_*
variable the plugin and the library read.

Pure logic: no vLLM, no etcd (the library is loaded only to check that it
words a bad timeout as the plugin does)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Dict, Set

import pytest

import nixl_etcd
from conftest import REPO, free_port
from nixl_etcd.vllm import ENV_VARS, register, use_etcd_from_env
from nixl_etcd.vllm import config
from nixl_etcd.vllm.config import ConfigError, PluginConfig, PrewarmConfig, load

BOOL_TRUE = ["1", "true", "TRUE", "True", "yes", "YES", "on", "On", " 1 ", "\ttrue\n"]
BOOL_FALSE = ["0", "false", "FALSE", "no", "No", "off", "OFF", " 0 "]
BLANK = ["", " ", "\t"]
BOOL_BAD = ["ture", "2", "enabled", "y", "n", "-1", "1.0", "on!", "t", "disable"]

USE_ETCD_ACCEPTS = (
    "use 1/true/yes/on to enable etcd coordination or 0/false/no/off for vLLM's stock handshake"
)
PREWARM_ACCEPTS = (
    "use 1/true/yes/on to pre-warm the handshakes with remote engines as they appear in etcd "
    "or 0/false/no/off to handshake on each engine's first request"
)


def timeout_message(raw: str) -> str:
    return (
        f"VLLM_NIXL_ETCD_TIMEOUT={raw} is not a timeout; give a number of seconds above 0 and "
        "at most 86400"
    )


def error_of(env: Dict[str, str]) -> str:
    with pytest.raises(ConfigError) as e:
        load(env)
    return str(e.value)


# -- defaults ----------------------------------------------------------------


def test_defaults() -> None:
    c = load({})
    assert c == PluginConfig(
        use_etcd=False, use_etcd_set=False, timeout_s=10.0, prewarm=None, allow_unsigned=False
    )
    assert c.etcd_for_explicit_connector  # EtcdNixlConnector: on unless set false
    assert PrewarmConfig.DEFAULT_MAX == 16
    assert config.DEFAULT_TIMEOUT_S == 10.0


@pytest.mark.parametrize("blank", BLANK)
def test_blank_is_unset(blank: str) -> None:
    env = {name: blank for name in config.VARIABLES}
    assert load(env) == load({})


def test_other_variables_are_not_read() -> None:
    # The library's variables are checked by the library when a client opens.
    assert load({"VLLM_NIXL_ETCD_LEASE_TTL": "x", "VLLM_NIXL_ETCD_ENDPOINTS": "?"}) == load({})


# -- VLLM_NIXL_USE_ETCD --------------------------------------------------------


@pytest.mark.parametrize("value", BOOL_TRUE)
def test_use_etcd_true(value: str) -> None:
    c = load({"VLLM_NIXL_USE_ETCD": value})
    assert (c.use_etcd, c.use_etcd_set, c.etcd_for_explicit_connector) == (True, True, True)


@pytest.mark.parametrize("value", BOOL_FALSE)
def test_use_etcd_false(value: str) -> None:
    c = load({"VLLM_NIXL_USE_ETCD": value})
    assert (c.use_etcd, c.use_etcd_set, c.etcd_for_explicit_connector) == (False, True, False)


@pytest.mark.parametrize("value", BOOL_BAD)
def test_use_etcd_typo_is_an_error_not_stock_vllm(value: str) -> None:
    assert error_of({"VLLM_NIXL_USE_ETCD": value}) == (
        f"VLLM_NIXL_USE_ETCD={value!r} is not a boolean; {USE_ETCD_ACCEPTS}"
    )


def test_the_example_message() -> None:
    assert error_of({"VLLM_NIXL_USE_ETCD": "ture"}) == (
        "VLLM_NIXL_USE_ETCD='ture' is not a boolean; use 1/true/yes/on to enable etcd "
        "coordination or 0/false/no/off for vLLM's stock handshake"
    )


# -- VLLM_NIXL_ETCD_TIMEOUT ------------------------------------------------------

GOOD_TIMEOUTS = {
    "10": 10.0,
    "2.5": 2.5,
    " 3 ": 3.0,
    "+5": 5.0,
    ".5": 0.5,
    "5.": 5.0,
    "1e1": 10.0,
    "2E-3": 0.002,
    "86400": 86400.0,
    "5e-10": 5e-10,  # rounds to 1 ns in the library: accepted there too
}
BAD_TIMEOUTS = [
    "ten", "0", "0.0", "-1", "-0.5", "86400.0000001", "1e400", "inf", "NaN", "1_0", "0x10",
    "10s", "1,5", "4.99e-10", ".", "e5", "1e", "١٠",
]


@pytest.mark.parametrize("raw,want", sorted(GOOD_TIMEOUTS.items()))
def test_timeout_good(raw: str, want: float) -> None:
    assert load({"VLLM_NIXL_ETCD_TIMEOUT": raw}).timeout_s == want


@pytest.mark.parametrize("raw", BAD_TIMEOUTS)
def test_timeout_bad_is_an_error_not_the_default(raw: str) -> None:
    assert error_of({"VLLM_NIXL_ETCD_TIMEOUT": raw}) == timeout_message(raw)


def test_timeout_message_keeps_the_value_as_given() -> None:
    assert error_of({"VLLM_NIXL_ETCD_TIMEOUT": " 0 "}) == timeout_message(" 0 ")


@pytest.mark.parametrize("raw", [r for r in BAD_TIMEOUTS if r != "١٠"] + [" 0 "])
def test_the_library_refuses_the_same_timeouts_in_the_same_words(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("VLLM_NIXL_ETCD_ENDPOINTS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("VLLM_NIXL_ETCD_TIMEOUT", raw)
    with pytest.raises(nixl_etcd.errors.InvalidArgument) as e:
        nixl_etcd.Client()
    assert str(e.value) == timeout_message(raw)


@pytest.mark.parametrize("raw", sorted(GOOD_TIMEOUTS))
def test_the_library_accepts_the_same_timeouts(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    # Nothing listens: the open gets past the configuration, to the connection.
    monkeypatch.setenv("VLLM_NIXL_ETCD_ENDPOINTS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("VLLM_NIXL_ETCD_TIMEOUT", raw)
    with pytest.raises(nixl_etcd.errors.ConnectionFailed):
        nixl_etcd.Client()


# -- VLLM_NIXL_ETCD_PREWARM* -----------------------------------------------------


def test_prewarm_off_unless_asked() -> None:
    assert load({}).prewarm is None
    for value in BOOL_FALSE:
        assert load({"VLLM_NIXL_ETCD_PREWARM": value}).prewarm is None
    for value in BOOL_TRUE:
        assert load({"VLLM_NIXL_ETCD_PREWARM": value}).prewarm == PrewarmConfig([], 16)


@pytest.mark.parametrize("value", BOOL_BAD)
def test_prewarm_typo_is_an_error(value: str) -> None:
    assert error_of({"VLLM_NIXL_ETCD_PREWARM": value}) == (
        f"VLLM_NIXL_ETCD_PREWARM={value!r} is not a boolean; {PREWARM_ACCEPTS}"
    )


def test_prewarm_engines_and_max() -> None:
    c = load({
        "VLLM_NIXL_ETCD_PREWARM": "on",
        "VLLM_NIXL_ETCD_PREWARM_ENGINES": " prefill-a*, p7 ,,",
        "VLLM_NIXL_ETCD_PREWARM_MAX": " 3 ",
    }).prewarm
    assert c is not None and (c.patterns, c.cap) == (["prefill-a*", "p7"], 3)
    assert c.wants("prefill-a12", own="d") and c.wants("p7", own="d")
    assert not c.wants("p70", own="d") and not c.wants("prefill-a1", own="prefill-a1")
    assert c.exact() is None
    exact = load({"VLLM_NIXL_ETCD_PREWARM": "1", "VLLM_NIXL_ETCD_PREWARM_ENGINES": "p1,p2"})
    assert exact.prewarm is not None and exact.prewarm.exact() == ["p1", "p2"]
    every = load({"VLLM_NIXL_ETCD_PREWARM": "1", "VLLM_NIXL_ETCD_PREWARM_ENGINES": "*"})
    assert every.prewarm is not None and every.prewarm.wants("x", own="d")
    plus = load({"VLLM_NIXL_ETCD_PREWARM": "1", "VLLM_NIXL_ETCD_PREWARM_MAX": "+7"}).prewarm
    assert plus is not None and plus.cap == 7


@pytest.mark.parametrize(
    "raw,piece",
    [("a*b", "a*b"), ("*a", "*a"), ("**", "**"), ("p1, pre*fill*", "pre*fill*"),
     ("ok,*,x*y", "x*y")],
)
def test_prewarm_engines_star_only_at_the_end(raw: str, piece: str) -> None:
    for prewarm in ("1", "0"):  # checked whether the pre-warm is on or off
        env = {"VLLM_NIXL_ETCD_PREWARM": prewarm, "VLLM_NIXL_ETCD_PREWARM_ENGINES": raw}
        assert error_of(env) == (
            f"VLLM_NIXL_ETCD_PREWARM_ENGINES={raw!r} has {piece!r}, which is neither an engine "
            "id nor a prefix ending in *; give engine ids or prefixes ending in *, comma-separated"
        )


@pytest.mark.parametrize("bad", ["0", "-2", "many", "1.5", "1_0", "0x4", "١"])
def test_prewarm_max_must_be_a_positive_integer(bad: str) -> None:
    for prewarm in ("1", "0"):
        assert error_of({"VLLM_NIXL_ETCD_PREWARM": prewarm, "VLLM_NIXL_ETCD_PREWARM_MAX": bad}) == (
            f"VLLM_NIXL_ETCD_PREWARM_MAX must be a positive integer (engines), got {bad!r}"
        )


def test_allow_unsigned() -> None:
    for value in BOOL_TRUE:
        assert load({"VLLM_NIXL_ETCD_ALLOW_UNSIGNED": value}).allow_unsigned is True
    for value in BOOL_FALSE + BLANK:
        assert load({"VLLM_NIXL_ETCD_ALLOW_UNSIGNED": value}).allow_unsigned is False


@pytest.mark.parametrize("value", BOOL_BAD + ["maybe"])
def test_allow_unsigned_typo_is_an_error_at_start(value: str) -> None:
    # Checked with or without signed records: unsigned.refusal() would only
    # say so at the first fallback.
    assert error_of({"VLLM_NIXL_ETCD_ALLOW_UNSIGNED": value}) == (
        f"VLLM_NIXL_ETCD_ALLOW_UNSIGNED={value!r} is not a boolean; use 1/true/yes/on to allow "
        "vLLM's unauthenticated direct handshake while records are signed or 0/false/no/off to "
        "keep it off"
    )


def test_allow_unsigned_agrees_with_unsigned_refusal() -> None:
    from nixl_etcd import unsigned

    signed = {"VLLM_NIXL_ETCD_HMAC_KEY_FILE": "/k"}
    for value in BOOL_TRUE + BOOL_FALSE + BLANK:
        env = dict(signed, VLLM_NIXL_ETCD_ALLOW_UNSIGNED=value)
        assert load(env).allow_unsigned == (unsigned.refusal(environ=env) is None)


# -- several bad values: one error, one line each ---------------------------------


def test_every_bad_value_in_one_error() -> None:
    with pytest.raises(ConfigError) as e:
        load({
            "VLLM_NIXL_USE_ETCD": "ture",
            "VLLM_NIXL_ETCD_TIMEOUT": "0",
            "VLLM_NIXL_ETCD_PREWARM": "yes",
            "VLLM_NIXL_ETCD_PREWARM_ENGINES": "a*b",
            "VLLM_NIXL_ETCD_PREWARM_MAX": "none",
            "VLLM_NIXL_ETCD_ALLOW_UNSIGNED": "si",
        })
    assert isinstance(e.value, RuntimeError)  # vLLM refuses to start with it
    want = [
        f"VLLM_NIXL_USE_ETCD='ture' is not a boolean; {USE_ETCD_ACCEPTS}",
        timeout_message("0"),
        "VLLM_NIXL_ETCD_PREWARM_ENGINES='a*b' has 'a*b', which is neither an engine id nor a "
        "prefix ending in *; give engine ids or prefixes ending in *, comma-separated",
        "VLLM_NIXL_ETCD_PREWARM_MAX must be a positive integer (engines), got 'none'",
        "VLLM_NIXL_ETCD_ALLOW_UNSIGNED='si' is not a boolean; use 1/true/yes/on to allow vLLM's "
        "unauthenticated direct handshake while records are signed or 0/false/no/off to keep "
        "it off",
    ]
    assert e.value.problems == want
    assert str(e.value) == "\n".join(want)
    again = pickle.loads(pickle.dumps(e.value))  # as across vLLM's processes
    assert (type(again), again.problems, str(again)) == (ConfigError, want, str(e.value))


def test_the_config_is_frozen() -> None:
    c = load({"VLLM_NIXL_USE_ETCD": "1"})
    with pytest.raises(AttributeError):
        c.use_etcd = False  # type: ignore[misc]
    assert hash(c) == hash(load({"VLLM_NIXL_USE_ETCD": "1"}))


# -- register() and use_etcd_from_env() -----------------------------------------


def clear(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "name,value",
    [("VLLM_NIXL_USE_ETCD", "ture"), ("VLLM_NIXL_ETCD_TIMEOUT", "ten"),
     ("VLLM_NIXL_ETCD_PREWARM", "maybe"), ("VLLM_NIXL_ETCD_PREWARM_ENGINES", "a*b"),
     ("VLLM_NIXL_ETCD_PREWARM_MAX", "0"), ("VLLM_NIXL_ETCD_ALLOW_UNSIGNED", "maybe")],
)
@pytest.mark.parametrize("use_etcd", [None, "0", "1"])
def test_register_refuses_a_bad_value(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, use_etcd: str
) -> None:
    clear(monkeypatch)
    if use_etcd is not None:
        monkeypatch.setenv("VLLM_NIXL_USE_ETCD", use_etcd)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as e:
        register()  # before any hook is installed, in every process vLLM starts
    env = {name: value} if use_etcd is None else {"VLLM_NIXL_USE_ETCD": use_etcd, name: value}
    assert str(e.value) == error_of(env)  # the messages checked above
    assert str(e.value).startswith(name) and value in str(e.value)


def test_register_with_etcd_off_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    clear(monkeypatch)
    assert register() is None
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "off")
    monkeypatch.setenv("VLLM_NIXL_ETCD_TIMEOUT", "3")
    assert register() is None


def test_use_etcd_from_env_uses_the_same_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    clear(monkeypatch)
    assert use_etcd_from_env() is False
    for value in BOOL_TRUE:
        monkeypatch.setenv("VLLM_NIXL_USE_ETCD", value)
        assert use_etcd_from_env() is True
    for value in BOOL_FALSE + BLANK:
        monkeypatch.setenv("VLLM_NIXL_USE_ETCD", value)
        assert use_etcd_from_env() is False
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "ture")
    with pytest.raises(ConfigError) as e:
        use_etcd_from_env()
    assert str(e.value) == f"VLLM_NIXL_USE_ETCD='ture' is not a boolean; {USE_ETCD_ACCEPTS}"


# -- ENV_VARS: every variable read, declared ----------------------------------------

# A whole name (a prefix followed by `_*`, as in "VLLM_NIXL_ETCD_*", is none).
NAME = re.compile(r"VLLM_NIXL_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_*])")


def plugin_names() -> Set[str]:
    # The plugin's modules and the package's modules it uses (nixl_etcd.unsigned ...).
    names: Set[str] = set()
    package = REPO / "python" / "nixl_etcd"
    for path in sorted([*package.glob("*.py"), *(package / "vllm").glob("*.py")]):
        names |= set(NAME.findall(path.read_text()))
    return names


def library_names() -> Set[str]:
    # The library's environment variables, where it defines them (src/config.rs)
    # and in its configuration reference's Environment table.
    rs = (REPO / "src" / "config.rs").read_text()
    consts = set(re.findall(r'pub const ENV_[A-Z_]+: &str = "(VLLM_NIXL_[A-Z0-9_]+)";', rs))
    doc = (REPO / "docs" / "configuration.md").read_text()
    env = doc.split("\n## Environment\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in env.splitlines() if line.startswith("|")]
    table = set(NAME.findall("\n".join(rows)))
    assert consts and table
    return consts | table


def test_env_vars_declares_every_variable_read() -> None:
    assert len(ENV_VARS) == len(set(ENV_VARS))
    missing = (plugin_names() | library_names() | set(config.VARIABLES)) - set(ENV_VARS)
    assert not missing, f"ENV_VARS lacks {sorted(missing)}"


def test_env_vars_declares_nothing_else() -> None:
    stale = set(ENV_VARS) - plugin_names() - library_names()
    assert not stale, f"ENV_VARS declares {sorted(stale)}, which nothing reads"


def test_the_plugins_variables_are_in_docs_vllm_md() -> None:
    doc = (REPO / "docs" / "vllm.md").read_text()
    for name in config.VARIABLES:
        assert f"| `{name}` |" in doc, name


def test_the_source_of_the_name_lists_is_real() -> None:
    # The parsers above find what they should (not a vacuous pass).
    lib = library_names()
    assert {"VLLM_NIXL_ETCD_ENDPOINTS", "VLLM_NIXL_ETCD_HMAC_PREVIOUS_KEY_FILE",
            "VLLM_NIXL_ETCD_PASSWORD", "VLLM_NIXL_SIDE_CHANNEL_HOST"} <= lib
    assert "VLLM_NIXL_ETCD" not in lib | plugin_names()
    assert set(config.VARIABLES) <= plugin_names()
    assert Path(config.__file__).name == "config.py"


def test_the_explicit_connector_path_checks_the_settings_before_hooking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # EtcdNixlConnector installs the hooks without vLLM's plugin loader
    # (register()): install() itself refuses a bad value, before any hook.
    from nixl_etcd.vllm import install

    monkeypatch.setenv("VLLM_NIXL_ETCD_TIMEOUT", "ten")
    monkeypatch.setattr(install, "_installed", False)
    with pytest.raises(ConfigError, match="VLLM_NIXL_ETCD_TIMEOUT=ten is not a timeout"):
        install.install()
    assert not install.installed()


def test_a_decode_with_a_setting_the_library_refuses_fails_at_start_not_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The decode worker's etcd client opens as its KV caches are registered
    # (engine start): a bad library setting is an error there; an unreachable
    # etcd is not (each request falls back as it comes).
    from types import SimpleNamespace

    from nixl_etcd.vllm import hooks, state

    monkeypatch.setitem(state.ORIG, "register_kv_caches", lambda self, kv: "registered")
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "1")

    def connector(role: str) -> SimpleNamespace:
        return SimpleNamespace(
            connector_worker=SimpleNamespace(),
            kv_transfer_config=SimpleNamespace(kv_role=role),
        )

    monkeypatch.setenv("VLLM_NIXL_ETCD_ENDPOINTS", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("VLLM_NIXL_ETCD_LEASE_TTL", "forever")
    with pytest.raises(nixl_etcd.InvalidArgument, match="VLLM_NIXL_ETCD_LEASE_TTL"):
        hooks._register_kv_caches(connector("kv_consumer"), {})
    # A prefill never reads: nothing is opened for it.
    assert hooks._register_kv_caches(connector("kv_producer"), {}) == "registered"
    monkeypatch.setenv("VLLM_NIXL_ETCD_LEASE_TTL", "10")
    monkeypatch.setenv("VLLM_NIXL_ETCD_TIMEOUT", "1")
    assert hooks._register_kv_caches(connector("kv_consumer"), {}) == "registered"


def test_current_parses_once_per_set_of_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooks ask for the settings on every request: parsed again only
    when a variable changed, and a bad value is still an error."""
    monkeypatch.setenv("VLLM_NIXL_ETCD_TIMEOUT", "7")
    first = config.current()
    assert config.current() is first and first.timeout_s == 7.0
    monkeypatch.setenv("VLLM_NIXL_ETCD_TIMEOUT", "8")
    assert config.current().timeout_s == 8.0
    monkeypatch.setenv("VLLM_NIXL_ETCD_TIMEOUT", "soon")
    with pytest.raises(config.ConfigError):
        config.current()
