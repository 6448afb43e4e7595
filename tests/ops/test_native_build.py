"""Compiling the native kernels on first use: where the sources and the cache are, and when it is not attempted.

The compile itself (minutes) is exercised by installing without torch in the build (`pip install .`) and running
`fastppo doctor`; these tests check the decisions around it without a compiler.
"""

from __future__ import annotations

from fastppo.ops import native_build


def test_sources_are_found_beside_the_package():
    sources = native_build.source_dir()
    assert sources is not None and (sources / "bindings.cpp").is_file()


def test_cache_folder_changes_with_torch_and_with_the_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    source = tmp_path / "op.cpp"
    source.write_text("int x;\n")
    first = native_build.cache_dir([str(source)], "2.13.0+cpu")
    assert first.parent == tmp_path
    assert native_build.cache_dir([str(source)], "2.13.0+cu126") != first
    source.write_text("int y;\n")
    assert native_build.cache_dir([str(source)], "2.13.0+cpu") != first


def test_switch_turns_the_compile_off(monkeypatch):
    monkeypatch.setenv(native_build.NO_JIT_VARIABLE, "1")
    native = native_build._jit_built()
    assert native.module is None and native_build.NO_JIT_VARIABLE in native.detail


def test_an_earlier_failure_is_reported_not_retried(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv(native_build.NO_JIT_VARIABLE, raising=False)
    sources_at = native_build.source_dir()
    sources = sorted(str(p) for p in sources_at.glob("*.cpp")) + sorted(str(p) for p in sources_at.glob("*.h"))
    directory = native_build.cache_dir(sources, torch.__version__)
    directory.mkdir(parents=True)
    (directory / native_build.FAILURE_FILE).write_text("no compiler\n")
    monkeypatch.setattr(native_build, "_compile", lambda *args: (_ for _ in ()).throw(AssertionError("compiled")))
    native = native_build._jit_built()
    assert native.module is None and "earlier build failed" in native.detail
