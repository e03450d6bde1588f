# SPDX-License-Identifier: Apache-2.0
"""``vllm ha-check``: preflight report for the vLLM-HA features."""

from __future__ import annotations

import argparse
import json
import sys
import typing

from vllm.entrypoints.cli.types import CLISubcommand

if typing.TYPE_CHECKING:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
else:
    FlexibleArgumentParser = argparse.ArgumentParser

_MARK = {"ok": "ok     ", "missing": "MISSING", "info": "info   "}


def _print_report(report) -> None:
    for check in report.checks:
        print(f"[{_MARK[check.status.value]}] {check.name:<15} {check.detail}")
    print()
    for feature, state in report.features().items():
        required = " (required)" if feature in report.required else ""
        if state["ok"]:
            print(f"feature {feature:<12} usable{required}")
        else:
            print(f"feature {feature:<12} NOT usable: needs {', '.join(state['missing'])}"
                  f"{required}")


class HACheckSubcommand(CLISubcommand):
    """The `ha-check` subcommand for the vLLM CLI."""

    name = "ha-check"

    @staticmethod
    def cmd(args: argparse.Namespace) -> None:
        from vllm.ha.preflight import run_preflight

        report = run_preflight(args.require)
        if args.json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            _print_report(report)
        sys.exit(0 if report.ok else 1)

    def validate(self, args: argparse.Namespace) -> None:
        from vllm.ha.preflight import parse_features

        try:
            args.require = parse_features(args.require or "")
        except ValueError as e:
            # argparse's convention: usage errors exit with status 2
            print(f"vllm ha-check: error: --require: {e}", file=sys.stderr)
            sys.exit(2)

    def subparser_init(
        self, subparsers: argparse._SubParsersAction
    ) -> FlexibleArgumentParser:
        parser = subparsers.add_parser(
            "ha-check",
            help="Check whether the vLLM-HA features can work on this machine.",
            description="Report the distribution, devices, driver, driver checkpoint "
            "API, NIXL backends, nvCOMP, GPU peer access and host memory; each line "
            "says ok / missing and why.",
            usage="vllm ha-check [--json] [--require mirror,checkpoint,...]",
        )
        parser.add_argument("--json", action="store_true",
                            help="Print the report as JSON (schema: "
                            "vllm/ha/schemas/ha_check.schema.json).")
        parser.add_argument(
            "--require", default="", metavar="FEATURES",
            help="Comma-separated features that must be usable (mirror, mirror-p2p, "
            "checkpoint, compression); exit status 1 if any is not.")
        return parser


def cmd_init() -> list[CLISubcommand]:
    return [HACheckSubcommand()]


def main(argv: list[str] | None = None) -> None:
    """``python -m vllm.entrypoints.cli.ha_check``: the same report without building
    every other subcommand's parser (``vllm serve``'s needs a detectable device,
    which a Docker build or a driver-less host does not have)."""
    parser = argparse.ArgumentParser(prog="vllm")
    command = HACheckSubcommand()
    command.subparser_init(parser.add_subparsers())
    args = parser.parse_args(["ha-check", *(sys.argv[1:] if argv is None else argv)])
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":
    main()
