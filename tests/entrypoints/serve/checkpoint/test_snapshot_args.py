# SPDX-License-Identifier: Apache-2.0
"""The fast-restart and snapshot flags as `vllm serve`'s parser reads them."""

from __future__ import annotations

import argparse

import pytest

from vllm.entrypoints.serve.checkpoint.snapshot_args import PREPIN_AUTO, add_cli_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_cli_args(parser)
    return parser.parse_args(list(argv))


def test_checkpoint_prepin_alone_sizes_itself_or_takes_gib():
    assert parse().checkpoint_prepin is None
    assert parse("--checkpoint-prepin").checkpoint_prepin == PREPIN_AUTO
    assert parse("--checkpoint-prepin", "13.5").checkpoint_prepin == 13.5


@pytest.mark.parametrize("bad", ["0", "-3", "lots", "inf", "nan"])
def test_checkpoint_prepin_refuses_what_is_not_a_size(bad, capsys):
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint-prepin", bad])
    err = capsys.readouterr().err
    assert "argument --checkpoint-prepin" in err and "positive number of GiB" in err, err
