"""Calls that need no etcd: the binding itself, version, enabled, target ranks,
options, the exception classes."""

from __future__ import annotations

import ctypes
import json
import re

import pytest

import nixl_etcd
from nixl_etcd import _ffi, errors
from conftest import HEADER


def header_functions() -> dict:
    """Function name -> whether it sits under `#if defined(NIXL_ETCD_WITH_NIXL)`."""
    text = HEADER.read_text()
    out = {}
    optional = False
    for line in text.splitlines():
        if line.startswith("#if defined(NIXL_ETCD_WITH_NIXL)"):
            optional = True
        elif line.startswith("#endif"):
            optional = False
        m = re.match(r"^(?:[\w ]+?[\s*]+)(nixl_etcd_\w+)\(", line)
        if m:
            out[m.group(1)] = optional
    return out


def test_every_export_of_the_header_is_declared():
    funcs = header_functions()
    assert len(funcs) >= 20, funcs
    assert set(funcs) == set(_ffi.EXPORTS)
    lib = _ffi.lib()
    for name, optional in funcs.items():
        if optional and not hasattr(lib, name):
            continue
        fn = getattr(lib, name)
        assert fn.argtypes is not None, name
        # void functions have restype None; the others a status or a string
        assert fn.restype in (None, ctypes.c_int32, ctypes.c_char_p, ctypes.c_bool), name
    assert lib.nixl_etcd_last_error.argtypes == []
    assert lib.nixl_etcd_buffer_free.restype is None


def test_struct_layouts_match_the_header():
    # sizes of the structs the library fills (x86_64 / aarch64 LP64)
    assert ctypes.sizeof(_ffi.c_buffer) == 16
    assert ctypes.sizeof(_ffi.c_record) == 8 + 4 + 4 + 8 + 4 + 4 + 8 + 8 + 8 + 16
    assert _ffi.c_record.metadata.offset == 56
    assert ctypes.sizeof(_ffi.c_event) == 4 + 4 + 8 + 4 + 4 + 8 + 8 + 8 + 8 + 8


def test_version_and_library_path():
    v = nixl_etcd.version()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", v), v
    assert nixl_etcd.__version__ == v
    assert nixl_etcd.library_path().endswith("libnixl_etcd.so")


@pytest.mark.parametrize(
    "value,expected",
    [(None, False), ("0", False), ("", False), ("no", False), ("1", True), ("true", True),
     ("yes", True), ("on", True)],
)
def test_enabled_follows_vllm_nixl_use_etcd(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("VLLM_NIXL_USE_ETCD", raising=False)
    else:
        monkeypatch.setenv("VLLM_NIXL_USE_ETCD", value)
    assert nixl_etcd.enabled() is expected


def test_status_str():
    assert nixl_etcd.status_str(0)
    assert nixl_etcd.status_str(-4) != nixl_etcd.status_str(-3)
    assert nixl_etcd.status_str(12345) == "unknown status"


@pytest.mark.parametrize(
    "local_tp,local_rank,remote_tp,expected",
    [
        (1, 0, 1, [0]),
        (8, 0, 4, [0]),
        (8, 1, 4, [0]),
        (8, 7, 4, [3]),
        (4, 0, 8, [0, 1]),
        (4, 3, 8, [6, 7]),
        (1, 0, 32, list(range(32))),  # more than the first try's room: retried
        (2, 1, 64, list(range(32, 64))),
    ],
)
def test_target_ranks(local_tp, local_rank, remote_tp, expected):
    assert nixl_etcd.target_ranks(local_tp, local_rank, remote_tp) == expected
    assert nixl_etcd.Client.target_ranks(local_tp, local_rank, remote_tp) == expected


@pytest.mark.parametrize("args", [(3, 0, 2), (4, 4, 2), (0, 0, 1), (2, 0, 3), (-1, 0, 1), (1, 0, 2**32)])
def test_target_ranks_refuses_bad_sizes(args):
    with pytest.raises(nixl_etcd.InvalidArgument) as e:
        nixl_etcd.target_ranks(*args)
    assert e.value.status == -1
    assert str(e.value)


def test_build_options():
    assert nixl_etcd.build_options() is None
    opts = json.loads(
        nixl_etcd.build_options(
            endpoints=["http://a:1", "http://b:2"], namespace="/x", timeout_s=2.5,
            lease_ttl_s=3, host="h", world_size=4, nixl_namespace="/n/", max_request_bytes=10,
        )
    )
    assert opts == {
        "endpoints": ["http://a:1", "http://b:2"], "namespace": "/x", "timeout_s": 2.5,
        "lease_ttl_s": 3, "host": "h", "world_size": 4, "nixl_namespace": "/n/",
        "max_request_bytes": 10,
    }
    assert json.loads(nixl_etcd.build_options(endpoints="http://a:1,http://b:2")) == {
        "endpoints": "http://a:1,http://b:2"
    }


ALL_CLASSES = [
    (-1, nixl_etcd.InvalidArgument),
    (-2, nixl_etcd.ConnectionFailed),
    (-3, nixl_etcd.NotFound),
    (-4, nixl_etcd.Timeout),
    (-5, nixl_etcd.TooLarge),
    (-6, nixl_etcd.Closed),
    (-7, nixl_etcd.InternalError),
    (-8, nixl_etcd.BadRecord),
    (-9, nixl_etcd.NixlError),
    (-10, nixl_etcd.PermissionDenied),
    (-11, nixl_etcd.BadSignature),
]


@pytest.mark.parametrize("status,cls", ALL_CLASSES)
def test_one_exception_class_per_status(status, cls):
    e = errors.error_for(status, "the message")
    assert type(e) is cls
    assert isinstance(e, nixl_etcd.NixlEtcdError)
    assert isinstance(e, RuntimeError)
    assert e.status == status == cls.STATUS
    assert str(e) == e.message == "the message"
    assert e.status_name.startswith("NIXL_ETCD_ERR_")
    import pickle

    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and back.status == status and str(back) == "the message"


def test_check_reads_the_library_message_for_statuses_it_cannot_produce_here():
    # INTERNAL (a caught panic) and NIXL (no NIXL build) cannot be provoked from
    # outside; check() maps them and falls back to the status text when the
    # thread has no message.
    with pytest.raises(nixl_etcd.InternalError) as e:
        errors.check(-7)
    assert e.value.status == -7 and str(e.value)
    with pytest.raises(nixl_etcd.NixlError):
        errors.check(-9)
    with pytest.raises(nixl_etcd.NixlEtcdError) as e:
        errors.check(-99)
    assert type(e.value) is nixl_etcd.NixlEtcdError and e.value.status == -99
    errors.check(0)


def test_library_not_found_is_an_import_error(monkeypatch, tmp_path):
    monkeypatch.setenv(_ffi.LIBRARY_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(nixl_etcd.LibraryNotFound) as e:
        _ffi._load()
    assert isinstance(e.value, ImportError)
    assert "NIXL_ETCD_LIBRARY" in str(e.value)


def test_library_env_may_name_a_directory(monkeypatch):
    from pathlib import Path

    monkeypatch.setenv(_ffi.LIBRARY_ENV, str(Path(nixl_etcd.library_path()).parent))
    _, path = _ffi._load()
    assert path.endswith("libnixl_etcd.so")
