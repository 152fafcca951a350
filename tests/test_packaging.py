"""What a non-editable install gets is what the source tree holds, checked without compiling anything.

The editable install the other tests use imports ctxkern from the source tree, so it cannot notice a
subpackage or data file that a wheel would leave out. These tests run setup.py's configuration (as the
build would, up to the point where it would compile) and ask setuptools what it would install and what
the sdist would carry, then compare that with the files present.
"""
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import setuptools  # noqa: F401  (before distutils: setuptools provides the distutils its setup() uses)
import distutils.core
import torch
import torch.utils.cpp_extension

from ctxkern import _dispatch

ROOT = Path(__file__).resolve().parents[1]
# Build outputs and caches that may lie in a development tree but are never sources.
NOT_SOURCES = (".so", ".pyd", ".pyc", ".pyo")


def configured_distribution(monkeypatch, **env):
    """setup.py's Distribution as `pip install .` configures it, stopped before any command runs.

    distutils.core.run_setup would do this but swallows SystemExit, which is how setup.py reports an error;
    this runs the script the same way and lets it through."""
    monkeypatch.chdir(ROOT)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["setup.py", "--name"])
    monkeypatch.setattr(distutils.core, "_setup_stop_after", "config")
    monkeypatch.setattr(distutils.core, "_setup_distribution", None)
    script = ROOT / "setup.py"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setuptools' deprecation notices about pyproject.toml fields
        exec(compile(script.read_text(), str(script), "exec"), {"__file__": str(script), "__name__": "__main__"})
    assert distutils.core._setup_distribution is not None, "setup.py did not call setup()"
    return distutils.core._setup_distribution


def tree_files(folder: Path, installed_as: str) -> set:
    """Every file under folder that is not a build output or hidden, as the path it has once installed."""
    files = set()
    for root, dirs, names in os.walk(folder):  # no followlinks: a ctxkern/kernels link is no source
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".") and not Path(root, d).is_symlink()]
        for name in names:
            path = Path(root, name)
            if not name.endswith(NOT_SOURCES) and not name.startswith(".") and not path.is_symlink():
                files.add(str(Path(installed_as, path.relative_to(folder))))
    return files


def test_a_wheel_holds_every_module_and_data_file_of_ctxkern_and_kernels(monkeypatch):
    dist = configured_distribution(monkeypatch, CTXKERN_CUDA="0")
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    shipped = {os.path.relpath(p, build_py.build_lib) for p in build_py.get_outputs(include_bytecode=0)}
    expected = (tree_files(ROOT / "ctxkern", "ctxkern") | tree_files(ROOT / "kernels", "ctxkern/kernels") |
                {"_ctxkern_cli.py"})                                # the command's entry point (setup.py)
    assert expected, "found no source file: the test looks in the wrong place"
    missing, extra = sorted(expected - shipped), sorted(shipped - expected)
    assert not missing, (f"a wheel would lack {missing}: a folder of modules needs an __init__.py "
                         "(setup.py finds packages by it), a data file an entry in setup.py's package_data")
    assert not extra, f"a wheel would hold files the tree does not: {extra}"


def test_the_compiled_modules_are_the_ones_ctxkern_loads(monkeypatch):
    dist = configured_distribution(monkeypatch, CTXKERN_CUDA="0")
    names = {ext.name for ext in dist.ext_modules}
    cpu_builds = _dispatch._CPU_BUILDS if platform.machine() in ("x86_64", "AMD64") else {"default": None}
    assert names == {"ctxkern._C"} | {f"ctxkern._cpu_{isa}" for isa in cpu_builds}
    assert all(name.rpartition(".")[0] in dist.packages for name in names)


def test_no_cxx_standard_is_fixed_so_torchs_build_chooses_the_one_its_headers_need(monkeypatch):
    # torch 2.14's headers stop with "#error C++20 or later" under the -std=c++17 that was fixed here.
    dist = configured_distribution(monkeypatch, CTXKERN_CUDA="0")
    for ext in dist.ext_modules:
        for compiler, flags in ext.extra_compile_args.items():
            assert not [f for f in flags if f.startswith("-std")], (ext.name, compiler, flags)


def test_the_sdist_holds_every_source_the_build_reads(monkeypatch, tmp_path):
    # python -m build makes the wheel from the sdist: a header left out of it breaks that build only.
    dist = configured_distribution(monkeypatch, CTXKERN_CUDA="0")
    egg_info = dist.get_command_obj("egg_info")  # what sdist runs to list its files
    egg_info.egg_base = str(tmp_path)  # its metadata and SOURCES.txt go there, not into the source tree
    egg_info.ensure_finalized()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        egg_info.run()
    carried = {os.path.normpath(f) for f in egg_info.filelist.files}
    needed = {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"}
    for folder in ("csrc", "ctxkern", "kernels"):
        needed |= tree_files(ROOT / folder, folder)
    assert not sorted(needed - carried), f"the sdist would lack {sorted(needed - carried)}: add them to MANIFEST.in"
    assert not [f for f in carried if f.endswith(NOT_SOURCES)], "the sdist would carry build outputs"


def fake_cuda_home(tmp_path, release="13.0", headers=False) -> Path:
    """A CUDA_HOME with an nvcc that reports `release`, and the runtime header only when asked."""
    home = tmp_path / f"cuda-{release}-{'headers' if headers else 'no-headers'}"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    if headers:
        (home / "include").mkdir()
        (home / "include" / "cuda_runtime.h").write_text("")
    return home


@pytest.fixture
def cuda_torch(monkeypatch):
    """This torch as if it were a CUDA 13.0 build (what `pip install torch` gives on Linux today)."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_INC_PATH", raising=False)

    def with_cuda_home(home):
        monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(home) if home else None)
    return with_cuda_home


def core_sources(dist) -> list:
    return next(ext for ext in dist.ext_modules if ext.name == "ctxkern._C").sources


# ctxkern._C without CUDA: the schemas and the eager entries.
CPU_ONLY_CORE = ["csrc/ops.cpp", "csrc/eager/layer_norm.cpp"]


def test_cuda_auto_builds_without_cuda_when_the_toolkit_headers_are_missing(monkeypatch, tmp_path, capfd,
                                                                             cuda_torch):
    # An nvcc on PATH outside the toolkit (/usr/local/bin/nvcc) makes torch take /usr/local for CUDA_HOME.
    cuda_torch(fake_cuda_home(tmp_path, headers=False))
    dist = configured_distribution(monkeypatch, CTXKERN_CUDA="auto")
    assert core_sources(dist) == CPU_ONLY_CORE
    note = capfd.readouterr().err
    assert "building without the CUDA kernels" in note and "cuda_runtime.h" in note, note
    with pytest.raises(SystemExit, match=r"CTXKERN_CUDA=1, but .*no cuda_runtime\.h in .*set CUDA_HOME"):
        configured_distribution(monkeypatch, CTXKERN_CUDA="1")


def test_cuda_auto_builds_without_cuda_when_nvcc_is_of_another_cuda_major(monkeypatch, tmp_path, cuda_torch):
    cuda_torch(fake_cuda_home(tmp_path, release="12.4", headers=True))
    assert core_sources(configured_distribution(monkeypatch, CTXKERN_CUDA="auto")) == CPU_ONLY_CORE
    with pytest.raises(SystemExit, match=r"an nvcc of CUDA 13\.x, .*is CUDA 12\.4"):
        configured_distribution(monkeypatch, CTXKERN_CUDA="1")


def test_cuda_is_built_when_the_toolkit_is_complete(monkeypatch, tmp_path, cuda_torch):
    cuda_torch(fake_cuda_home(tmp_path, headers=True))
    dist = configured_distribution(monkeypatch, CTXKERN_CUDA="auto")
    sources = core_sources(dist)
    assert "csrc/cuda/bindings.cpp" in sources and any(s.endswith(".cu") for s in sources), sources
    nvcc_flags = next(ext for ext in dist.ext_modules if ext.name == "ctxkern._C").extra_compile_args["nvcc"]
    assert not [f for f in nvcc_flags if f.startswith("-std")], nvcc_flags
    assert core_sources(configured_distribution(monkeypatch, CTXKERN_CUDA="0")) == CPU_ONLY_CORE


def test_cuda_1_without_nvcc_says_what_is_missing(monkeypatch, cuda_torch):
    cuda_torch(None)
    with pytest.raises(SystemExit, match=r"lacks nvcc \(not on PATH, and CUDA_HOME is not set\)"):
        configured_distribution(monkeypatch, CTXKERN_CUDA="1")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make (as `make test` does)")
def test_make_clean_removes_every_built_module_and_the_stamp_and_no_source(monkeypatch, tmp_path):
    dist = configured_distribution(monkeypatch, CTXKERN_CUDA="0")
    build_ext = dist.get_command_obj("build_ext")
    built = [build_ext.get_ext_filename(ext.name) for ext in dist.ext_modules]  # as built in place
    sources = ["setup.py", "pyproject.toml", "csrc/ops.cpp", "csrc/cpu/layer_norm.cpp", "ctxkern/__init__.py",
               "kernels/layer_norm.py", "requirements.txt", ".venv/.deps"]
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for name in sources + built + [".venv/.built", "build/lib/x.o"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    os.utime(tmp_path / "requirements.txt", (0, 0))  # older than the .deps stamp: deps are not reinstalled
    subprocess.run(["make", "clean"], cwd=tmp_path, check=True, capture_output=True)
    assert not [name for name in built + [".venv/.built", "build"] if (tmp_path / name).exists()]
    assert all((tmp_path / name).exists() for name in sources), "make clean deleted a source"
    plan = subprocess.run(["make", "-n", "build"], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert "pip install --no-build-isolation -e \".[models]\"" in plan, f"the next make would not rebuild:\n{plan}"


def test_an_isolated_build_without_torch_says_to_use_no_build_isolation():
    # What pip's default (isolated) build runs into: a Python with setuptools and no torch.
    no_torch = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
                "exec(open('setup.py').read())")
    run = subprocess.run([sys.executable, "-c", no_torch], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0
    assert "isolated environment" in run.stderr and "pip install --no-build-isolation" in run.stderr, run.stderr


def test_a_setuptools_too_old_to_build_wheels_alone_says_what_to_install(monkeypatch):
    # A fresh Python 3.11 venv has setuptools 65.5 and no `wheel`: its build would fail late, on bdist_wheel.
    monkeypatch.setattr(setuptools, "__version__", "65.5.0")
    monkeypatch.setitem(sys.modules, "wheel", None)
    with pytest.raises(SystemExit, match=r"needs setuptools>=70\.1 \(this is 65\.5\.0\) or the `wheel` package"):
        configured_distribution(monkeypatch, CTXKERN_CUDA="0")
