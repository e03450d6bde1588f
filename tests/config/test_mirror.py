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


def test_defaults_and_bad_staging_size():
    cfg = MirrorConfig(peer="cpu")
    assert (cfg.transport, cfg.staging_mib, cfg.allow_same_device) == ("staged", 256, False)
    with pytest.raises(ValidationError, match="--mirror-staging-mib must be >= 1"):
        MirrorConfig(peer="cpu", staging_mib=0)
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


def _parse(argv):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", *argv]))


def test_flags_reach_the_engine_args_and_build_the_config():
    from vllm.config.mirror import from_engine_args

    args = _parse(["--mirror-peer", "cuda:1", "--mirror-transport", "direct",
                   "--mirror-staging-mib", "64", "--mirror-allow-same-device",
                   "--mirror-required"])
    assert from_engine_args(args) == MirrorConfig(peer="cuda:1", transport="direct",
                                                  staging_mib=64, allow_same_device=True,
                                                  required=True)
    assert from_engine_args(_parse([])) is None


@pytest.mark.parametrize("argv,message", [
    (["--mirror-transport", "direct"], "--mirror-transport needs --mirror-peer"),
    (["--mirror-required"], "--mirror-required needs --mirror-peer"),
    (["--mirror-peer", "cpu", "--no-enable-prefix-caching"], "needs prefix caching"),
    (["--mirror-peer", "tcp://x:1"], "--mirror-peer 'tcp://x:1' is not a peer"),
])
def test_bad_flag_combinations_name_the_flag(argv, message):
    from vllm.config.mirror import from_engine_args

    with pytest.raises(ValueError, match=message):
        from_engine_args(_parse(argv))


def test_unknown_transport_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        _parse(["--mirror-peer", "cpu", "--mirror-transport", "pigeon"])
    assert "--mirror-transport" in capsys.readouterr().err
