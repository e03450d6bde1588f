"""``python -m habuild {apply,remove,check,stage}``: the series + overlay, by hand.

``apply`` is what the Docker image and the GPU host run on an installed vLLM 0.26.0;
``check`` is the patch-hygiene gate (every hunk at its exact line, no fuzz, no offset).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from habuild import BuildError
from habuild.assemble import apply_to_site, check_series, remove_from_site, stage_from_wheel
from habuild.upstream import Target, UpstreamWheel, detect_target, resolve_wheel


def _default_site() -> Path:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("no vllm package is importable here: pass --site DIR")
    return Path(list(spec.submodule_search_locations)[0]).parent


def _target(name: str | None) -> Target:
    return detect_target({"VLLM_HA_TARGET": name} if name else None)


def _wheel(args: argparse.Namespace) -> UpstreamWheel:
    if args.wheel:
        return UpstreamWheel(Path(args.wheel))
    return UpstreamWheel(resolve_wheel(_target(args.target)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m habuild", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_apply = sub.add_parser("apply", help="apply onto an installed vLLM 0.26.0")
    p_apply.add_argument("--site", help="site-packages dir holding vllm/ (default: the importable one)")
    p_remove = sub.add_parser("remove", help="undo 'apply'")
    p_remove.add_argument("--site")
    for name, help_ in (("check", "dry-run the series against the upstream wheel"),
                        ("stage", "write the patched tree into DEST")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--wheel", help="upstream wheel file (default: cache or download)")
        p.add_argument("--target", help="cuda or cpu (default: detect)")
        if name == "stage":
            p.add_argument("dest")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "apply":
            info = apply_to_site(Path(args.site) if args.site else _default_site())
            print(f"vllm-ha {info.ha_version} applied ({', '.join(info.patches)})")
        elif args.cmd == "remove":
            site = Path(args.site) if args.site else _default_site()
            print("removed" if remove_from_site(site) else f"nothing to remove in {site}")
        elif args.cmd == "check":
            wheel = _wheel(args)
            result = check_series(wheel)
            for h in result.hunks:
                state = "ok" if not h.offset else f"OFFSET {h.offset:+d}"
                print(f"{h.patch}: {h.path} {h.header} {state}")
            if result.offsets:
                print(f"{len(result.offsets)} hunk(s) apply only at an offset: "
                      "refresh the series (python -m habuild.patchq)", file=sys.stderr)
                return 1
            print(f"{len(result.patches)} patch(es) apply cleanly to {wheel.path.name}")
        elif args.cmd == "stage":
            dest = Path(args.dest)
            dest.mkdir(parents=True, exist_ok=True)
            stage_from_wheel(_wheel(args), _target(args.target), dest)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
