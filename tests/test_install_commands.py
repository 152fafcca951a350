"""The README's other install commands, run as written: a wheel from `python -m build --wheel --no-isolation`, and
`pip install --no-build-isolation .`, into a fresh virtual environment, from which `ctxkern embed` and
`ctxkern search` then run (the editable install that `make` makes is the README's main command, checked by every
`make`).

The fresh environments see this one's packages (torch, the build tools, the bundled model) through a .pth file,
so nothing is fetched; pip leaves the editable ctxkern they can also see alone ("outside environment"). The
build runs in a copy of the source tree: the wheel's build folder then serves the non-editable install, which
compiles nothing again, and the checkout stays clean. One full compile: a few minutes on two cores.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POLYSEMY = ["The bank approved my loan application.", "I sat on the bank of the river."]

pytestmark = pytest.mark.install


def _source_copy(dest: Path) -> Path:
    """The files git tracks (what a clean clone has), with no build output of this tree."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _fresh_venv(path: Path) -> Path:
    """A new virtual environment that also sees this environment's site-packages; -> its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = next(path.glob("lib/python*/site-packages"))
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path / "bin"


def _run(cmd, cwd, timeout=1200) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _check_installed(bin_dir: Path, workdir: Path) -> None:
    """ctxkern imports from the fresh environment (not the source tree), with its compiled modules, and the
    main commands run."""
    where = _run([bin_dir / "python", "-c", "import ctxkern, ctxkern.models, ctxkern.integrations, ctxkern.kernels;"
                  "print(ctxkern.__file__); print(ctxkern.backends()['cpu'])"], cwd=workdir)
    location, cpu = where.split("\n")[:2]
    assert str(bin_dir.parent) in location and str(ROOT) not in location, location
    assert cpu == "available", cpu
    embed = _run([bin_dir / "ctxkern", "embed", *POLYSEMY], cwd=workdir, timeout=300)
    assert re.search(r"\d\.\d\d", embed), embed  # the similarity matrix
    search = _run([bin_dir / "ctxkern", "search", "--query", "How do neural networks learn?", "--top", "2"],
                  cwd=workdir, timeout=300)
    assert search.strip(), search
    # An index with its query encoder, searched by the installed command's torch-free path (_ctxkern_cli).
    (workdir / "corpus.txt").write_text("\n".join(POLYSEMY) + "\n")
    _run([bin_dir / "ctxkern", "index", "build", workdir / "corpus.txt", "--out", workdir / "ix", "--no-progress"],
         cwd=workdir, timeout=300)
    assert (workdir / "ix" / "query" / "model.onnx").is_file()
    light = _run([bin_dir / "python", "-c", "import sys, _ctxkern_cli; rc = _ctxkern_cli.main(['search', '--index', "
                  f"{str(workdir / 'ix')!r}, '--query', 'river', '--top', '1']); assert 'torch' not in sys.modules; "
                  "sys.exit(rc)"], cwd=workdir, timeout=300)
    assert "line 2: I sat on the bank of the river." in light, light


@pytest.mark.slow
def test_the_wheel_and_the_non_editable_install_work_as_the_readme_writes_them(tmp_path):
    src = _source_copy(tmp_path / "src")
    # pip, build and setuptools come from the outer environment; `pip install build` is then already satisfied.
    bin_dir = _fresh_venv(tmp_path / "env")
    _run([bin_dir / "python", "-m", "pip", "install", "build"], cwd=src)
    _run([bin_dir / "python", "-m", "build", "--wheel", "--no-isolation"], cwd=src)
    wheels = list((src / "dist").glob("ctxkern-*.whl"))
    assert len(wheels) == 1, wheels
    _run([bin_dir / "python", "-m", "pip", "install", str(wheels[0])], cwd=tmp_path)
    _check_installed(bin_dir, tmp_path)

    # The same environment, so the same compiler commands: the wheel's build folder serves, nothing recompiles.
    _run([bin_dir / "python", "-m", "pip", "uninstall", "--yes", "ctxkern"], cwd=tmp_path)
    _run([bin_dir / "python", "-m", "pip", "install", "--no-build-isolation", "."], cwd=src)
    _check_installed(bin_dir, tmp_path)
