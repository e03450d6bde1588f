# SPDX-License-Identifier: Apache-2.0
"""``vllm serve`` flags for snapshots on disk (patch 0015 adds them to the parser and
calls :func:`apply` before the engine is built).

``--restore-from ROOT/NAME`` verifies the snapshot (every file's checksums) before
anything starts, then makes the engine load from it: weights through the
``ha_snapshot`` load format, the prefix cache at engine startup, the model's
configuration and tokenizer from the snapshot when no MODEL is given, and the recorded
engine settings where the command line leaves them at their defaults. A snapshot this
server could not load is refused here, naming the flag and the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from vllm.logger import init_logger

from vllm.v1.checkpoint.compile_cache import CACHE_DIRS, PLAN_DIR, install_cache_files
from vllm.v1.checkpoint.snapshot import SnapshotError, SnapshotStore
from vllm.v1.engine.snapshot import LOAD_FORMAT, ha_version

logger = init_logger(__name__)

_DTYPES = {"half": "float16", "float16": "float16", "bfloat16": "bfloat16",
           "float": "float32", "float32": "float32"}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Snapshots (vLLM-HA)",
        "Snapshots on disk: a lost process or node restarts with its weights and "
        "prefix cache in seconds (docs/snapshots.md).")
    group.add_argument(
        "--snapshot-root", type=str, default=None,
        help="Directory that holds this server's snapshots. `POST /checkpoint` with "
        '{"snapshot": NAME} and `POST /snapshot` write ROOT/NAME; nothing outside it '
        "is ever written.")
    group.add_argument(
        "--snapshot-interval", type=float, default=None,
        help="Seconds between snapshots of the serving engine into ROOT/periodic "
        "(needs --snapshot-root). The engine pauses between two steps while what "
        "changed is copied to host memory, and serves while the files are written; "
        "weights are written once and linked afterwards.")
    group.add_argument(
        "--restore-from", type=str, default=None,
        help="Start from the snapshot ROOT/NAME: weights, prefix cache and (when no "
        "MODEL is given) the model's configuration and tokenizer come from it.")


    restart = parser.add_argument_group(
        "Fast restart (vLLM-HA)",
        "POST /checkpoint and POST /restore (docs/checkpoint.md).")
    restart.add_argument(
        "--checkpoint-prepin", nargs="?", const=PREPIN_AUTO, default=None,
        type=prepin_gib, metavar="GIB",
        help="Pin host memory for a checkpoint image while the server starts, so the "
        "first POST /checkpoint does not pin it while the engine is paused (10 GiB in "
        "1.3-2.7 s on an H100 host): 0.7x the weights' bytes (what compressed bf16 "
        "weights need), or GIB per worker to leave room for the KV blocks a "
        "checkpoint keeps (compressed, ~0.7x their bytes). What does not fit is pinned "
        "during the checkpoint. The memory stays pinned for later checkpoints.")


PREPIN_AUTO = "auto"


def prepin_gib(value: str) -> float | str:
    """``--checkpoint-prepin [GIB]``: a positive number of GiB, or ``auto`` (the flag
    alone)."""
    if value == PREPIN_AUTO:
        return value
    try:
        gib = float(value)
    except ValueError:
        gib = 0.0
    if not gib > 0 or gib == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a positive number of GiB (or the flag alone), got {value!r}")
    return gib


def _error(flag: str, message: str) -> SystemExit:
    return SystemExit(f"vllm serve: error: argument {flag}: {message}")


def _default(name: str) -> Any:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.openai.cli_args import FrontendArgs

    for cls in (EngineArgs, FrontendArgs):
        if hasattr(cls, name):
            return getattr(cls, name)
    return None


def apply(args: argparse.Namespace) -> None:
    """Check the snapshot flags; with ``--restore-from``, point the engine at it."""
    if getattr(args, "snapshot_root", None):
        # Inherited by the engine's processes (patch 0016: CPU weights stay readable).
        os.environ["VLLM_HA_SNAPSHOT_WEIGHTS"] = "1"
    interval = getattr(args, "snapshot_interval", None)
    if interval is not None:
        if not interval > 0:
            raise _error("--snapshot-interval", f"must be > 0 seconds, got {interval}")
        if not getattr(args, "snapshot_root", None):
            raise _error("--snapshot-interval", "needs --snapshot-root DIR")
    path = getattr(args, "restore_from", None)
    if not path:
        return
    t0 = time.perf_counter()
    store, name = SnapshotStore.at(path)
    logger.info("Restore from %s: verifying the snapshot ...", path)
    try:
        snap = store.read(name, ha_version=ha_version())
    except SnapshotError as e:
        raise _error("--restore-from", str(e)) from None
    size = sum(e["size"] for e in snap.manifest["files"].values())
    logger.info("Restore from %s: %s (%.2f GiB, %d files) verified in %.2f s", path,
                snap.path.name, size / 2**30, len(snap.manifest["files"]),
                time.perf_counter() - t0)
    ident, meta = snap.identity, snap.meta
    # The model: the command line's, else the snapshot's configuration files.
    if getattr(args, "model_tag", None) is None and args.model == _default("model"):
        if "model/config.json" not in snap.manifest["files"]:
            raise _error("--restore-from", f"{snap.path} holds no model files "
                         f"(it was taken of {meta.get('model')!r}): give MODEL")
        args.model = str(snap.path / "model")
    # Recorded settings where the command line left the default.
    for key, value in (meta.get("engine_args") or {}).items():
        if hasattr(args, key) and getattr(args, key) == _default(key):
            setattr(args, key, value)
    for flag, key, have in (("--block-size", "block_size", args.block_size),
                            ("--dtype", "dtype", _DTYPES.get(str(args.dtype), args.dtype))):
        if have not in (None, "auto") and have != ident.get(key):
            raise _error(flag, f"{have} does not match the snapshot {path} "
                         f"({key}={ident.get(key)}); drop the flag or use another snapshot")
    if args.dtype == "auto":
        args.dtype = ident["dtype"]
    if getattr(args, "load_format", "auto") not in ("auto", LOAD_FORMAT):
        raise _error("--load-format", "the weights come from --restore-from; drop "
                     "--load-format")
    args.load_format = LOAD_FORMAT
    extra = args.model_loader_extra_config or {}
    if isinstance(extra, str):
        extra = json.loads(extra)
    args.model_loader_extra_config = {**extra, "snapshot": str(snap.path)}
    _use_cache_files(snap, args.model, meta)


def _use_cache_files(snap: Any, model: str, meta: dict[str, Any]) -> None:
    """The snapshot's compile cache and startup plan go where vLLM looks for them, and
    this server's model hashes as the snapshot's (vLLM's cache key includes it)."""
    original = meta.get("model")
    if original and original != model:
        os.environ["VLLM_HA_RESTORED_MODEL"] = json.dumps([model, original])
    names = [rel for rel in snap.manifest["files"]
             if rel.startswith(tuple(f"{d}/" for d in CACHE_DIRS))]
    if not names:
        logger.info("Restore from %s: the snapshot holds no compile cache (the engine "
                    "compiles)", snap.path)
        return
    t0 = time.perf_counter()
    try:
        res = install_cache_files(snap.path, names)
    except (OSError, SnapshotError) as e:
        # An optimisation only: the engine compiles as on a cold start.
        logger.warning("Restore from %s: the compile cache was not installed (%s); the "
                       "engine compiles", snap.path, e)
        return
    plans = any(rel.startswith(f"{PLAN_DIR}/") for rel in names)
    if plans:
        # Upstream's opt-in; the plan is applied only if the GPU has as much free
        # memory as when it was measured.
        os.environ.setdefault("VLLM_ENABLE_STARTUP_PLAN", "1")
    logger.info("Restore from %s: compile cache%s in place (%d files installed, %d "
                "already there) in %.2f s", snap.path, " and startup plan" if plans else "",
                res["installed"], res["kept"], time.perf_counter() - t0)
