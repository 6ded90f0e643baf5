"""onnxopt.passes.quantize.cpu: reading the CPU's int8 capabilities from /proc/cpuinfo text."""

from __future__ import annotations

from onnxopt.passes.quantize.cpu import cpu_flags, int8_pairs_saturate

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n"
VNNI = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512_vnni\n"


def test_flags_and_model_name_are_read_from_cpuinfo() -> None:
    assert cpu_flags(AVX2) == ("AMD EPYC", frozenset({"fpu", "sse2", "avx2", "fma"}))
    assert cpu_flags("") == ("", frozenset())


def test_only_x86_without_vnni_saturates() -> None:
    assert int8_pairs_saturate("x86_64", AVX2)
    assert not int8_pairs_saturate("x86_64", VNNI)
    assert not int8_pairs_saturate("x86_64", VNNI.replace("avx512_vnni", "avx_vnni"))
    assert not int8_pairs_saturate("aarch64", AVX2)  # Arm dot products do not saturate
    assert not int8_pairs_saturate("arm64")
