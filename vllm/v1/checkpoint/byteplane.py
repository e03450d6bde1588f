# SPDX-License-Identifier: Apache-2.0
"""Byte-plane compression of 16-bit tensors for checkpoints and offloaded weights.

A bf16 value's high byte is its sign and 7 exponent bits, its low byte the rest of
the mantissa. In trained (and normally initialised) weights the exponent byte takes
few values and compresses well (~2.7x with nvCOMP ANS on an H100), while mantissa
bytes are close to uniform and do not compress at all; compressed together, the two
dilute each other (~1.24x). So each tensor is split into byte planes, each plane goes
through the codec, and a plane that does not shrink enough is stored raw (decoding a
raw plane costs a copy, not a decompression).

Codecs: :class:`NvcompPlaneCodec` (nvCOMP on the GPU: bytes are compressed before
they cross PCIe) and :class:`ZlibPlaneCodec` (CPU, for hosts without nvCOMP and for
tests); both are byte-exact.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
from vllm.logger import init_logger

logger = init_logger(__name__)

# A compressed plane must save at least this fraction of its size to be kept.
MIN_SAVING = 0.02
# Planes smaller than this are stored raw (nvCOMP also wants 16-byte aligned input).
MIN_PLANE_BYTES = 4096


class PlaneCodec(Protocol):
    name: str

    def encode(self, plane: torch.Tensor) -> torch.Tensor:
        """uint8 1-D tensor -> compressed uint8 1-D tensor (same device)."""

    def decode(self, data: torch.Tensor, nbytes: int) -> torch.Tensor:
        """Compressed uint8 tensor -> the ``nbytes`` original bytes (same device)."""


class ZlibPlaneCodec:
    """CPU codec (zlib/DEFLATE): what a host without nvCOMP uses."""

    def __init__(self, level: int = 1) -> None:
        self.level = level
        self.name = f"zlib-{level}"

    def encode(self, plane: torch.Tensor) -> torch.Tensor:
        data = zlib.compress(plane.cpu().numpy().tobytes(), self.level)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def decode(self, data: torch.Tensor, nbytes: int) -> torch.Tensor:
        raw = zlib.decompress(data.cpu().numpy().tobytes())
        if len(raw) != nbytes:
            raise ValueError(f"corrupt plane: {len(raw)} bytes decoded, {nbytes} expected")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


class NvcompPlaneCodec:
    """nvCOMP on the GPU (ANS, GDeflate, ...): planes never leave the device."""

    def __init__(self, algorithm: str = "ANS") -> None:
        try:
            from nvidia import nvcomp
        except ImportError as e:
            raise RuntimeError(
                f"nvCOMP is not available ({e}): pip install 'vllm[nvcomp]'; checkpoints "
                "are stored uncompressed without it") from None
        self._nvcomp = nvcomp
        self._codec = nvcomp.Codec(algorithm=algorithm)
        self.name = f"nvcomp-{algorithm.lower()}"

    # Results come back through __cuda_array_interface__ (the tensor keeps nvCOMP's
    # buffer alive); nvCOMP 6.0's __dlpack__ exported a wrong length and a buffer it
    # could not read back on an H100 (heap corruption in the test run).
    def encode(self, plane: torch.Tensor) -> torch.Tensor:
        out = self._codec.encode(self._nvcomp.as_array(plane))
        return torch.as_tensor(out, device=plane.device).view(torch.uint8).reshape(-1)

    def decode(self, data: torch.Tensor, nbytes: int) -> torch.Tensor:
        out = self._codec.decode(self._nvcomp.as_array(data))
        plane = torch.as_tensor(out, device=data.device).view(torch.uint8).reshape(-1)
        if plane.numel() != nbytes:
            raise ValueError(f"corrupt plane: {plane.numel()} bytes decoded, {nbytes} expected")
        return plane


@dataclass
class EncodedPlane:
    compressed: bool
    data: torch.Tensor  # uint8, 1-D
    nbytes: int  # the plane's raw size


@dataclass
class EncodedTensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    codec: str
    planes: list[EncodedPlane] = field(default_factory=list)

    @property
    def raw_bytes(self) -> int:
        return sum(p.nbytes for p in self.planes)

    @property
    def stored_bytes(self) -> int:
        return sum(p.data.numel() for p in self.planes)

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(self.stored_bytes, 1)


class ByteplaneCodec:
    """Splits tensors into byte planes and compresses each with a :class:`PlaneCodec`."""

    def __init__(self, codec: PlaneCodec, min_saving: float = MIN_SAVING) -> None:
        self.codec = codec
        self.min_saving = min_saving

    @staticmethod
    def split(t: torch.Tensor) -> list[torch.Tensor]:
        """Byte planes of ``t``, most significant first; one plane for 1-byte dtypes."""
        if not t.is_contiguous():
            raise ValueError("byte-plane split needs a contiguous tensor")
        size = t.element_size()
        u8 = t.reshape(-1).view(torch.uint8).view(-1, size)
        # Little-endian: the last byte of each element holds sign and exponent.
        return [u8[:, i].contiguous() for i in reversed(range(size))]

    def encode(self, t: torch.Tensor) -> EncodedTensor:
        enc = EncodedTensor(t.dtype, tuple(t.shape), self.codec.name)
        for plane in self.split(t):
            if plane.numel() < MIN_PLANE_BYTES:  # not worth a kernel (nor aligned)
                enc.planes.append(EncodedPlane(False, plane, plane.numel()))
                continue
            packed = self.codec.encode(plane)
            if packed.numel() <= plane.numel() * (1 - self.min_saving):
                enc.planes.append(EncodedPlane(True, packed, plane.numel()))
            else:
                enc.planes.append(EncodedPlane(False, plane, plane.numel()))
        return enc

    def decode(self, enc: EncodedTensor, device: torch.device | str | None = None
               ) -> torch.Tensor:
        planes = [self.codec.decode(p.data, p.nbytes) if p.compressed else p.data
                  for p in enc.planes]
        device = device if device is not None else planes[0].device
        size = len(planes)
        u8 = torch.empty(planes[0].numel(), size, dtype=torch.uint8, device=device)
        for i, plane in enumerate(planes):
            u8[:, size - 1 - i] = plane.to(device)
        return u8.view(-1).view(enc.dtype).view(enc.shape)
