"""MirrorConfig: peer parsing and the startup checks, each error naming its flag."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vllm.config.mirror import MirrorConfig, MirrorPeer


@pytest.mark.parametrize("value,peer", [("cpu", MirrorPeer("cpu")),
                                        ("cuda:1", MirrorPeer("cuda", 1)),
                                        (" cuda:0 ", MirrorPeer("cuda", 0))])
def test_peer_strings(value, peer):
    assert MirrorPeer.parse(value) == peer
    assert str(peer) == value.strip()


@pytest.mark.parametrize("value", ["gpu", "cuda", "cuda:-1", "cuda:x", "tcp://h:1", ""])
def test_invalid_peer_names_the_flag(value):
    with pytest.raises(ValidationError, match=r"--mirror-peer .* is not a peer: use 'cpu'"):
        MirrorConfig(peer=value)


def test_defaults_and_bad_interval():
    cfg = MirrorConfig(peer="cpu")
    assert (cfg.transport, cfg.tail_sync_interval, cfg.required) == ("staged", 0, False)
    with pytest.raises(ValidationError, match="--mirror-tail-sync-interval must be >= 0"):
        MirrorConfig(peer="cpu", tail_sync_interval=-1)
    with pytest.raises(ValidationError):
        MirrorConfig(peer="cpu", transport="carrier-pigeon")


def test_absent_peer_device_is_refused():
    with pytest.raises(ValueError, match=r"--mirror-peer cuda:1: no such device \(this host "
                                         r"has 1 CUDA device"):
        MirrorConfig(peer="cuda:1").check_devices("cuda:0", 1)


def test_same_device_needs_the_explicit_flag():
    with pytest.raises(ValueError, match="is the primary's own device.*--mirror-allow-same"):
        MirrorConfig(peer="cuda:0").check_devices("cuda:0", 1)
    MirrorConfig(peer="cuda:0", allow_same_device=True).check_devices("cuda:0", 1)
    MirrorConfig(peer="cuda:1").check_devices("cuda:0", 2)
    MirrorConfig(peer="cpu").check_devices("cpu", 0)
