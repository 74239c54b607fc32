"""The vLLM plugin's pre-warm settings (VLLM_NIXL_ETCD_PREWARM*): which remote
engines a decode pre-warms, how many, and what a bad value says. Pure logic:
no vLLM, no etcd (the pre-warm itself runs in test_vllm_pd.py)."""

from __future__ import annotations

import pytest

from nixl_etcd.vllm.config import PrewarmConfig


def config(monkeypatch: pytest.MonkeyPatch, **env: str):
    for k in ("VLLM_NIXL_ETCD_PREWARM", "VLLM_NIXL_ETCD_PREWARM_ENGINES",
              "VLLM_NIXL_ETCD_PREWARM_MAX"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return PrewarmConfig.from_env()


def test_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config(monkeypatch) is None
    assert config(monkeypatch, VLLM_NIXL_ETCD_PREWARM="0") is None
    assert config(monkeypatch, VLLM_NIXL_ETCD_PREWARM="off") is None
    assert config(monkeypatch, VLLM_NIXL_ETCD_PREWARM="1") is not None


def test_every_engine_but_its_own_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    c = config(monkeypatch, VLLM_NIXL_ETCD_PREWARM="1")
    assert (c.patterns, c.cap) == ([], 16)
    assert c.wants("prefill_engine", own="decode_engine")
    assert not c.wants("decode_engine", own="decode_engine")
    assert c.exact() is None  # followed through one subscription to all engines


def test_ids_and_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    c = config(monkeypatch, VLLM_NIXL_ETCD_PREWARM="true",
               VLLM_NIXL_ETCD_PREWARM_ENGINES=" prefill-a*, p7 ,", VLLM_NIXL_ETCD_PREWARM_MAX="3")
    assert (c.patterns, c.cap) == (["prefill-a*", "p7"], 3)
    assert c.wants("prefill-a", own="d") and c.wants("prefill-a12", own="d")
    assert c.wants("p7", own="d")
    assert not c.wants("p70", own="d") and not c.wants("prefill-b", own="d")
    assert c.exact() is None
    exact = config(monkeypatch, VLLM_NIXL_ETCD_PREWARM="1",
                   VLLM_NIXL_ETCD_PREWARM_ENGINES="p1,p2")
    assert exact.exact() == ["p1", "p2"]  # one subscription per engine


@pytest.mark.parametrize("bad", ["0", "-2", "many"])
def test_a_bad_cap_is_named(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    with pytest.raises(ValueError) as e:
        config(monkeypatch, VLLM_NIXL_ETCD_PREWARM="1", VLLM_NIXL_ETCD_PREWARM_MAX=bad)
    assert str(e.value) == (
        f"VLLM_NIXL_ETCD_PREWARM_MAX must be a positive integer (engines), got {bad!r}"
    )
