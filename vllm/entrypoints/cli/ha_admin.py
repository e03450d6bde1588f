# SPDX-License-Identifier: Apache-2.0
"""``vllm checkpoint URL``, ``vllm restore URL`` and ``vllm snapshot-load URL NAME``: the
CLI of ``POST /checkpoint``, ``POST /restore`` and ``POST /snapshot/load`` (an HTTP
client; nothing of the engine is imported)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from vllm.entrypoints.cli.types import CLISubcommand

TIMEOUT_S = 3600.0


def call(url: str, path: str, body: dict[str, Any] | None, key: str | None,
         method: str = "POST") -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {"error": e.reason}


def _summary(status: dict[str, Any]) -> str:
    sizes = status.get("sizes") or {}
    gib = 2**30
    parts = [f"state {status.get('state')}"]
    if sizes:
        parts.append(f"weights {sizes.get('weights_raw', 0) / gib:.2f} -> "
                     f"{sizes.get('weights_stored', 0) / gib:.2f} GiB, "
                     f"{sizes.get('kv_blocks', 0)} KV blocks")
    if status.get("codec"):
        parts.append(f"codec {status['codec']} (ratio {status.get('ratio')})")
    if status.get("phases_s"):
        parts.append(" ".join(f"{k} {v:.2f}s" for k, v in status["phases_s"].items()))
    if status.get("gpu_memory_mib") is not None:
        parts.append(f"GPU memory held {status['gpu_memory_mib']} MiB")
    return "; ".join(parts)


class _AdminSubcommand(CLISubcommand):
    path = ""
    help = ""
    usage = "URL [options]"

    def body(self, args: argparse.Namespace) -> dict[str, Any] | None:
        return None

    def summary(self, out: dict[str, Any]) -> str:
        return _summary(out)

    def cmd(self, args: argparse.Namespace) -> None:
        key = args.api_key or os.environ.get("VLLM_HA_ADMIN_KEY") or os.environ.get(
            "VLLM_API_KEY")
        code, out = call(args.url, self.path, self.body(args), key)
        if args.json or code != 200:
            print(json.dumps(out, indent=2))
        else:
            print(self.summary(out))
        if code != 200:
            print(f"vllm {self.name}: HTTP {code}: {out.get('error', out)}",
                  file=sys.stderr)
            sys.exit(1)

    def subparser_init(self, subparsers: argparse._SubParsersAction):
        parser = subparsers.add_parser(self.name, help=self.help, description=self.help,
                                       usage=f"vllm {self.name} {self.usage}")
        parser.add_argument("url", help="The server, e.g. http://localhost:8000")
        parser.add_argument("--api-key", default=None,
                            help="Bearer token (default: $VLLM_HA_ADMIN_KEY, else "
                            "$VLLM_API_KEY).")
        parser.add_argument("--json", action="store_true",
                            help="Print the server's whole answer as JSON.")
        self.add_options(parser)
        return parser

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        pass


class CheckpointSubcommand(_AdminSubcommand):
    name = "checkpoint"
    path = "/checkpoint"
    help = ("Checkpoint a running server (POST /checkpoint): weights and KV to host "
            "memory, compressed, and the GPU released; `vllm restore` brings it back.")

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--drop-kv", action="store_true",
                            help="Drop the KV cache and prefix cache instead of keeping "
                            "the blocks in use.")
        parser.add_argument("--in-flight", choices=("wait", "keep"), default="wait",
                            help="wait: running requests finish first; keep: they are "
                            "checkpointed with the engine.")
        parser.add_argument("--codec", default="auto",
                            choices=("auto", "ans", "gdeflate", "zlib", "none"))
        parser.add_argument("--no-release-gpu", action="store_true",
                            help="Offload only; skip the driver checkpoint.")
        parser.add_argument("--wait-timeout", type=float, default=300.0,
                            help="Seconds to wait for running requests (in-flight wait).")

    def body(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"keep_kv": not args.drop_kv, "in_flight": args.in_flight,
                "codec": args.codec, "release_gpu": not args.no_release_gpu,
                "wait_timeout_s": args.wait_timeout}


class RestoreSubcommand(_AdminSubcommand):
    name = "restore"
    path = "/restore"
    help = "Restore a checkpointed server (POST /restore); held requests are served."


class SnapshotLoadSubcommand(_AdminSubcommand):
    name = "snapshot-load"
    path = "/snapshot/load"
    usage = "URL NAME [options]"
    help = ("Make an idle server (a warm spare) the one a snapshot was taken of (POST "
            "/snapshot/load): weights in place, prefix cache replaced.")

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", help="The snapshot ROOT/NAME under the server's "
                            "--snapshot-root.")
        parser.add_argument("--no-verify", action="store_true",
                            help="Skip the checksums of the files read.")
        parser.add_argument("--reload-weights", action="store_true",
                            help="Read the weights even if the server holds them already.")

    def body(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"name": args.name, "verify": not args.no_verify,
                "reload_weights": args.reload_weights}

    def summary(self, out: dict[str, Any]) -> str:
        phases = " ".join(f"{k} {v:.2f}s" for k, v in (out.get("phases_s") or {}).items())
        return (f"loaded {out.get('name')} ({out.get('path')}): weights {out.get('weights')}, "
                f"{out.get('kv_blocks')} KV blocks; {phases}")


def cmd_init() -> list[CLISubcommand]:
    return [CheckpointSubcommand(), RestoreSubcommand(), SnapshotLoadSubcommand()]


def main(argv: list[str]) -> None:
    """The subcommands without building every other subcommand's parser."""
    parser = argparse.ArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="subcommand")
    commands = {c.name: c for c in cmd_init()}
    for c in commands.values():
        c.subparser_init(sub)
    args = parser.parse_args(argv)
    commands[args.subcommand].cmd(args)
