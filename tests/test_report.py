"""The report's CPU facts."""
import report


def test_vnni_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma avx512f avx512_vnni\n")
    assert report.cpu_has_vnni(info) is True
    info.write_text("model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16\n")  # AVX2/AVX512 only
    assert report.cpu_has_vnni(info) is False
    assert report.cpu_has_vnni(tmp_path / "missing") is None
