# SPDX-License-Identifier: Apache-2.0
"""Fast restart (``POST /checkpoint`` / ``POST /restore``): the pieces built so far.

``byteplane``: compression of offloaded weights and KV blocks, byte planes apart.
``state``: the checkpoint lifecycle and the calls each state allows.
``snapshot``: snapshots on disk, whole or absent, verified before use.
"""
