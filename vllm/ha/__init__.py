# SPDX-License-Identifier: Apache-2.0
"""vLLM-HA: the parts of this distribution that are not a single upstream hook.

``version`` says what this build is (upstream base, patches, target); ``preflight``
answers whether the HA features can work on this machine (``vllm ha-check``).
"""
