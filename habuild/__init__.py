"""Build machinery of the vLLM-HA distribution.

Upstream vLLM (a wheel, or an installed tree) + ``patches/series`` + the ``vllm/``
overlay -> a ``vllm`` distribution with a ``+haN`` local version. Used by
``setup.py``, by ``python -m habuild`` (apply onto an installed tree, check the
series) and by the developer patch queue ``python -m habuild.patchq``.
"""

UPSTREAM_VERSION = "0.26.0"
HA_LOCAL = "ha1"
HA_VERSION = f"{UPSTREAM_VERSION}+{HA_LOCAL}"


def ha_version(target_name: str) -> str:
    """The distribution version for a target. The CPU build carries ``.cpu`` like
    upstream's ``0.26.0+cpu``: vLLM picks its CPU platform from that substring of
    the installed ``vllm`` version (``vllm/platforms/__init__.py``)."""
    return HA_VERSION + (".cpu" if target_name == "cpu" else "")


class BuildError(RuntimeError):
    """A build or apply step that cannot go on; the message says what to do."""
