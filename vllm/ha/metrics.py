# SPDX-License-Identifier: Apache-2.0
"""One set of each feature's Prometheus metrics per process."""

from __future__ import annotations

from typing import Any, TypeVar

_T = TypeVar("_T", bound="ProcessMetrics")


class ProcessMetrics:
    """Subclasses create their metrics in ``__init__``; :meth:`get` makes it once per
    process: prometheus refuses a second registration of a name (a server restarted
    in-process, a second manager)."""

    _instances: dict[type, Any] = {}

    @classmethod
    def get(cls: type[_T]) -> _T:
        if cls not in ProcessMetrics._instances:
            ProcessMetrics._instances[cls] = cls()
        return ProcessMetrics._instances[cls]
