"""Byte-plane compression: byte-exact round trips; raw planes where nothing is saved."""

from __future__ import annotations

import pytest
import torch

from vllm.v1.checkpoint.byteplane import ByteplaneCodec, NvcompPlaneCodec, ZlibPlaneCodec

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def codec_for(device: str) -> ByteplaneCodec:
    return ByteplaneCodec(NvcompPlaneCodec("ANS") if device == "cuda" else ZlibPlaneCodec())


def weights(dtype: torch.dtype, device: str, n: int = 1 << 18) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    return (torch.randn(n // 256, 256, generator=g) * 0.02).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_round_trip_is_byte_exact(device, dtype):
    t = weights(dtype, device) if dtype.is_floating_point else torch.randint(
        -128, 127, (512, 64), dtype=dtype, device=device)
    codec = codec_for(device)
    enc = codec.encode(t)
    out = codec.decode(enc)
    assert out.dtype == t.dtype and out.shape == t.shape and out.device == t.device
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))
    assert len(enc.planes) == t.element_size() and enc.raw_bytes == t.numel() * t.element_size()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_exponent_plane_compresses_and_mantissa_plane_is_stored_raw(device):
    enc = codec_for(device).encode(weights(torch.bfloat16, device))
    exponent, mantissa = enc.planes
    assert exponent.compressed and exponent.data.numel() < exponent.nbytes / 1.5
    assert not mantissa.compressed and mantissa.data.numel() == mantissa.nbytes
    assert enc.ratio > 1.2


def test_incompressible_bytes_are_stored_raw_and_cost_nothing_extra():
    noise = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8).view(torch.bfloat16)
    enc = ByteplaneCodec(ZlibPlaneCodec()).encode(noise)
    assert [p.compressed for p in enc.planes] == [False, False]
    assert enc.stored_bytes == enc.raw_bytes


def test_split_orders_planes_most_significant_first():
    t = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)  # 0x3f80, 0xc000
    hi, lo = ByteplaneCodec.split(t)
    assert hi.tolist() == [0x3F, 0xC0] and lo.tolist() == [0x80, 0x00]


def test_non_contiguous_input_is_refused():
    with pytest.raises(ValueError, match="contiguous"):
        ByteplaneCodec.split(torch.zeros(8, 8, dtype=torch.bfloat16).t())


def test_corrupt_plane_is_detected():
    codec = ByteplaneCodec(ZlibPlaneCodec())
    enc = codec.encode(weights(torch.bfloat16, "cpu"))
    enc.planes[0].nbytes += 1
    with pytest.raises(ValueError, match="corrupt plane"):
        codec.decode(enc)


def test_without_nvcomp_the_error_says_how_to_get_it():
    try:
        import nvidia.nvcomp  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"pip install 'vllm\[nvcomp\]'"):
            NvcompPlaneCodec()
    else:
        pytest.skip("nvCOMP is installed here")
