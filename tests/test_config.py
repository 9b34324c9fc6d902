"""The typed TOML loader (shared.config) and the two hosts' config classes that use it.

Every operator mistake must come back as one ConfigError naming the file, the key and, where the
key is in the file, its line; and `dump()` must write what `load()` reads back unchanged.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mainhost.config import ApiConfig, MainHostConfig, SipConfig, StunConfig, TrunkConfig
from remotehost.config import RemoteHostConfig
from remotehost.config import TrunkConfig as RemoteTrunkConfig
from shared import config as cfg
from shared.config import ConfigError


@dataclass(frozen=True)
class Inner:
    port: int = cfg.field(10, "A port.")
    ratio: float = cfg.field(0.5, "A ratio.")

    def __post_init__(self) -> None:
        cfg.check_port("inner.port", self.port)


@dataclass(frozen=True)
class Sample:
    """Every type the loader knows, and one key without a default."""

    name: str
    enabled: bool = cfg.field(True, "A switch.")
    count: int = cfg.field(3, "A count.")
    where: Path = cfg.field(Path("/tmp/x"), "A path.")  # noqa: RUF009 (a Path is immutable)
    tags: tuple[str, ...] = cfg.field((), "Some tags.")
    maybe: str | None = cfg.field(None, "Optional text.")
    inner: Inner = dataclasses.field(default_factory=Inner)


def write(tmp_path: Path, text: str, name: str = "host.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(cls: type[object], path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        cfg.load(cls, path)
    message = str(info.value)
    assert "\n" not in message, "an operator error is one line"
    return message


# --- good files ---


def test_load_every_type(tmp_path):
    path = write(
        tmp_path,
        'name = "x"\nenabled = false\ncount = 7\nwhere = "/srv/d"\ntags = ["a", "b"]\n'
        'maybe = "m"\n[inner]\nport = 99\nratio = 2\n',
    )
    loaded = cfg.load(Sample, path)
    assert loaded == Sample(
        name="x",
        enabled=False,
        count=7,
        where=Path("/srv/d"),
        tags=("a", "b"),
        maybe="m",
        inner=Inner(port=99, ratio=2.0),
    )
    assert isinstance(loaded.inner.ratio, float)
    assert isinstance(loaded.tags, tuple)


def test_defaults_fill_what_is_missing(tmp_path):
    assert cfg.load(Sample, write(tmp_path, 'name = "only"\n')) == Sample(name="only")


def test_mainhost_config_loads_minimal_file(tmp_path):
    path = write(tmp_path, 'public_address = "203.0.113.5"\n', "mainhost.toml")
    loaded = cfg.load(MainHostConfig, path)
    assert loaded.public_address == "203.0.113.5"
    assert loaded.trunk == TrunkConfig()


# --- operator mistakes ---


def test_unknown_key_names_file_key_line_and_known_keys(tmp_path):
    path = write(tmp_path, 'public_address = "1.2.3.4"\n\n[trunk]\nport = 5090\nprot = 1\n')
    message = load_error(MainHostConfig, path)
    assert str(path) in message
    assert "'trunk.prot'" in message
    assert "(line 5)" in message
    assert "port" in message  # the known keys are listed, so a typo is easy to spot


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, 'public_address = "1.2.3.4"\nmedia_prot = 3\n')
    message = load_error(MainHostConfig, path)
    assert "'media_prot'" in message and "(line 2)" in message and str(path) in message


def test_unknown_table_names_its_header_line(tmp_path):
    path = write(tmp_path, 'public_address = "1.2.3.4"\n\n[trunks]\nport = 1\n')
    message = load_error(MainHostConfig, path)
    assert "'trunks'" in message and "(line 3)" in message


@pytest.mark.parametrize(
    ("text", "key", "line", "expected"),
    [
        ('[trunk]\nport = "5090"\n', "trunk.port", 3, "whole number"),
        ("[trunk]\nport = 5090.0\n", "trunk.port", 3, "whole number"),
        ("[trunk]\nport = true\n", "trunk.port", 3, "whole number"),
        ("[stun]\nenabled = 1\n", "stun.enabled", 3, "true or false"),
        ('[trunk]\nheartbeat_interval = "1"\n', "trunk.heartbeat_interval", 3, "number"),
        ("[trunk]\nlisten = 0\n", "trunk.listen", 3, "string"),
    ],
)
def test_wrong_type(tmp_path, text, key, line, expected):
    path = write(tmp_path, 'public_address = "1.2.3.4"\n' + text)
    message = load_error(MainHostConfig, path)
    assert str(path) in message
    assert f"'{key}'" in message
    assert f"(line {line})" in message
    assert expected in message


def test_wrong_type_in_tuple_and_path(tmp_path):
    message = load_error(Sample, write(tmp_path, 'name = "x"\ntags = ["a", 3]\n'))
    assert "'tags'" in message and "(line 2)" in message and "string" in message
    message = load_error(Sample, write(tmp_path, 'name = "x"\ntags = "a"\n'))
    assert "'tags'" in message and "list" in message
    message = load_error(Sample, write(tmp_path, 'name = "x"\nwhere = 5\n'))
    assert "'where'" in message and "path" in message


def test_table_given_as_scalar(tmp_path):
    path = write(tmp_path, 'public_address = "1.2.3.4"\ntrunk = 5\n')
    message = load_error(MainHostConfig, path)
    assert "[trunk]" in message and "table" in message and "(line 2)" in message


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("[trunk]\nport = 70000\n", "trunk.port", 3),
        ("[trunk]\nport = -1\n", "trunk.port", 3),
        ('[trunk]\nlisten = "1.2.3"\n', "trunk.listen", 3),
        ('[trunk]\nlisten = "localhost"\n', "trunk.listen", 3),
        ("[stun]\nalternate_port = 65536\n", "stun.alternate_port", 3),
        ('[stun]\nalternate_address = "300.1.1.1"\n', "stun.alternate_address", 3),
        ('[api]\nlisten = "::g"\n', "api.listen", 3),
        ("[trunk]\nheartbeat_interval = 0\n", "trunk.heartbeat_interval", 3),
        ("[trunk]\nheartbeat_interval = 2.0\ndead_after = 1.0\n", "trunk.dead_after", 4),
        ('[sip]\nrealm = ""\n', "sip.realm", 3),
        ("media_port = 99999\n", "media_port", 2),
    ],
)
def test_bad_value_names_key_and_line(tmp_path, text, key, line):
    path = write(tmp_path, 'public_address = "1.2.3.4"\n' + text)
    message = load_error(MainHostConfig, path)
    assert str(path) in message
    assert f"'{key}'" in message
    assert f"(line {line})" in message


def test_remotehost_bad_values(tmp_path):
    path = write(tmp_path, 'office = "lyon"\n[trunk]\nmain_host = "h"\nport = 0\n')
    message = load_error(RemoteHostConfig, path)
    assert "'trunk.port'" in message and "(line 4)" in message
    path = write(tmp_path, 'office = "lyon"\n[trunk]\nmain_host = "h"\nconnect_timeout = -2\n')
    message = load_error(RemoteHostConfig, path)
    assert "'trunk.connect_timeout'" in message and "(line 4)" in message


def test_missing_required_key(tmp_path):
    message = load_error(Sample, write(tmp_path, "count = 1\n"))
    assert str(tmp_path / "host.toml") in message
    assert "missing" in message and "'name'" in message


def test_missing_value_that_validation_requires(tmp_path):
    message = load_error(MainHostConfig, write(tmp_path, "[trunk]\nport = 1\n"))
    assert "'public_address'" in message and "must be set" in message
    message = load_error(RemoteHostConfig, write(tmp_path, '[trunk]\nmain_host = "h"\n'))
    assert "'office'" in message
    message = load_error(RemoteHostConfig, write(tmp_path, 'office = "o"\n[trunk]\nport = 1\n'))
    assert "'trunk.main_host'" in message


@dataclass(frozen=True)
class NeedsPort:
    port: int


@dataclass(frozen=True)
class Outer:
    section: NeedsPort


def test_nested_missing_required_key_is_dotted(tmp_path):
    message = load_error(Outer, write(tmp_path, "[section]\n"))
    assert "'section.port'" in message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('public_address = "1.2.3.4\n', 1),
        ("public_address = \n", 1),
        ('public_address = "a"\n[trunk\nport = 1\n', 2),
        ('public_address = "a"\npublic_address = "b"\n', 2),
    ],
)
def test_broken_toml(tmp_path, text, line):
    path = write(tmp_path, text)
    message = load_error(MainHostConfig, path)
    assert str(path) in message
    assert "not valid TOML" in message
    assert f"line {line}" in message


def test_missing_file(tmp_path):
    message = load_error(MainHostConfig, tmp_path / "nothere.toml")
    assert str(tmp_path / "nothere.toml") in message and "no such file" in message


def test_unreadable_file_is_a_config_error(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b'public_address = "\xff\xfe"\n')
    message = load_error(MainHostConfig, path)
    assert str(path) in message


# --- dump ---


def test_dump_writes_doc_comments_and_loads_back(tmp_path):
    config = MainHostConfig(public_address="198.51.100.7")
    text = cfg.dump(config)
    assert "# Trunk port (TCP, TLS). Remote hosts dial out to it." in text
    assert "[trunk]" in text and "[stun]" in text
    assert cfg.load(MainHostConfig, write(tmp_path, text)) == config


def test_dump_of_sample_loads_back(tmp_path):
    config = Sample(name="n", tags=("x", 'q"uote'), maybe=None, where=Path("/a b/c"))
    assert cfg.load(Sample, write(tmp_path, cfg.dump(config))) == config


def test_field_refuses_mutable_defaults():
    with pytest.raises(TypeError):
        cfg.field([], "no lists")


ports = st.integers(0, 65535)
ips = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
texts = st.text(max_size=30)
positive = st.floats(min_value=0.001, max_value=1e6, allow_nan=False)


@st.composite
def mainhost_configs(draw: st.DrawFn) -> MainHostConfig:
    heartbeat = draw(positive)
    return MainHostConfig(
        public_address=draw(texts.filter(bool)),
        media_port=draw(ports),
        trunk=TrunkConfig(
            listen=draw(ips),
            port=draw(ports),
            heartbeat_interval=heartbeat,
            dead_after=heartbeat + draw(positive),
            login_failures_before_delay=draw(st.integers(-(2**63), 2**63 - 1)),
        ),
        stun=StunConfig(
            enabled=draw(st.booleans()),
            # An alternate address needs a specific primary one (RFC 3489 CHANGED-ADDRESS).
            listen=draw(ips.filter(lambda ip: ip not in ("0.0.0.0", "::"))),
            port=draw(ports),
            alternate_port=draw(ports),
            alternate_address=draw(st.just("") | ips),
        ),
        api=ApiConfig(enabled=draw(st.booleans()), listen=draw(ips), port=draw(ports)),
        sip=SipConfig(realm=draw(texts.filter(lambda s: bool(s) and '"' not in s))),
    )


@given(config=mainhost_configs())
@settings(max_examples=150)
def test_dump_round_trip_mainhost(config):
    text = cfg.dump(config)
    tomllib.loads(text)  # valid TOML, whatever the strings hold
    assert cfg.from_dict(MainHostConfig, tomllib.loads(text), source="x", text=text) == config


@given(
    office=texts.filter(bool),
    main_host=texts.filter(bool),
    port=st.integers(1, 65535),
    sip_listen=ips,
    stun_server=texts,
)
@settings(max_examples=100)
def test_dump_round_trip_remotehost(office, main_host, port, sip_listen, stun_server):
    from remotehost.config import SipConfig as RemoteSip
    from remotehost.config import StunConfig as RemoteStun

    config = RemoteHostConfig(
        office=office,
        trunk=RemoteTrunkConfig(main_host=main_host, port=port),
        stun=RemoteStun(server=stun_server),
        sip=RemoteSip(listen=sip_listen),
    )
    text = cfg.dump(config)
    assert cfg.from_dict(RemoteHostConfig, tomllib.loads(text), source="x", text=text) == config


@given(
    name=texts,
    tags=st.lists(texts, max_size=4).map(tuple),
    maybe=st.none() | texts.filter(bool),
    count=st.integers(-(2**63), 2**63 - 1),
    ratio=st.floats(allow_nan=False),
)
def test_dump_round_trip_sample(name, tags, maybe, count, ratio):
    config = Sample(name=name, tags=tags, maybe=maybe, count=count, inner=Inner(ratio=ratio))
    text = cfg.dump(config)
    assert cfg.from_dict(Sample, tomllib.loads(text), source="x", text=text) == config


@given(text=st.text(max_size=200))
@settings(max_examples=300)
def test_loading_any_text_raises_only_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "f.toml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg.load(MainHostConfig, path)
    except ConfigError as exc:
        assert str(path) in str(exc)
        assert "\n" not in str(exc)


def test_missing_table_is_checked_like_an_empty_one(tmp_path):
    # Without [trunk] a remote host has no main host to dial: that is an error, not a default.
    message = load_error(RemoteHostConfig, write(tmp_path, 'office = "lyon"\n'))
    assert "'trunk.main_host'" in message and "must be set" in message
    loaded = cfg.load(MainHostConfig, write(tmp_path, 'public_address = "192.0.2.1"\n'))
    assert loaded.stun == StunConfig() and loaded.api == ApiConfig()
