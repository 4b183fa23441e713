"""The sdist and the package metadata: what `pip install` of a release gets.

The sdist is built (setuptools' PEP 517 hook, PRONG_EXT_NO_EXTENSION=1, so no compiler runs) from a
copy of the checkout's tracked files, with stand-ins for the outputs of an in-place build added,
and its file list is compared with `git ls-files`: every source of the package and of the
extension (csrc/ whole, CUDA included) ships, no build output does. scripts/build_wheel.sh builds
real wheels from the unpacked sdist (`make wheel`, `make wheel-cpu`).
"""

import ast
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_FILES = {"README.md", "LICENSE", "pyproject.toml", "setup.py", "MANIFEST.in"}
BUILD_OUTPUTS = [  # what `pip install -e .` leaves in the source folders; none may ship
    "prong_ext/_build_info.py",
    "prong_ext/_C.cpython-311-x86_64-linux-gnu.so",
    "prong_ext/__pycache__/nn.cpython-311.pyc",
    "triton_kernels/__pycache__/covariance.cpython-311.pyc",
]


def _tracked(*paths):
    out = subprocess.run(["git", "ls-files", "--", *paths], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return [p for p in out.stdout.splitlines() if (ROOT / p).is_file()]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """(names in the sdist relative to its top folder, its PKG-INFO, its entry_points.txt)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    src = tmp_path_factory.mktemp("checkout")
    for rel in _tracked():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    for rel in BUILD_OUTPUTS:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("# a build output\n")
    out_dir = tmp_path_factory.mktemp("sdist")
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    run = subprocess.run(
        [sys.executable, "-c", hook, str(out_dir)],
        cwd=src,
        env={**_env(), "PRONG_EXT_NO_EXTENSION": "1"},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (archive,) = out_dir.glob("prong_ext-*.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        top = members[0].name.split("/")[0]
        names = {m.name.split("/", 1)[1] for m in members}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
        entry_points = tar.extractfile(f"{top}/prong_ext.egg-info/entry_points.txt").read().decode()
    return names, pkg_info, entry_points


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith("PRONG_EXT_")}


def test_sdist_ships_every_source_file_and_no_build_output(sdist):
    names, _, _ = sdist
    expected = set(_tracked("csrc", "prong_ext", "triton_kernels")) | TOP_FILES
    # setuptools' own additions: the metadata and the egg-info folder.
    shipped = {
        n for n in names if n not in ("PKG-INFO", "setup.cfg") and not n.startswith("prong_ext.egg-info/")
    }
    assert "csrc/eigh_common.h" in shipped and any(n.startswith("csrc/cuda/") for n in shipped)
    assert not expected - shipped, f"missing from the sdist: {sorted(expected - shipped)}"
    assert not shipped - expected, f"shipped but not a tracked source: {sorted(shipped - expected)}"


def test_metadata_is_static_in_pyproject(sdist):
    _, pkg_info, entry_points = sdist
    meta = email.parser.Parser().parsestr(pkg_info)
    version = ast.literal_eval(
        re.search(r"^__version__ = (.+)$", (ROOT / "prong_ext/_version.py").read_text(), re.M).group(1)
    )
    assert meta["Name"] == "prong_ext"
    assert meta["Version"] == version
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().startswith("# prong_ext"), "the README is the long description"
    assert meta["Summary"]
    requires = set(meta.get_all("Requires-Dist"))
    assert {"torch>=2.11", "numpy"} <= requires
    assert 'triton>=3.6; extra == "triton"' in requires
    for extra in ("experiments", "demo"):
        assert {f'{p}; extra == "{extra}"' for p in ("matplotlib", "tqdm", "scikit-learn")} <= requires
    assert {"triton", "experiments", "demo"} <= set(meta.get_all("Provides-Extra"))
    assert any(c.startswith("Programming Language :: Python :: 3") for c in meta.get_all("Classifier"))
    assert re.search(r"^\[console_scripts\]\nprong-ext = prong_ext.cli:main$", entry_points, re.M)


def test_version_is_defined_in_one_place_only():
    import prong_ext
    from prong_ext import _version

    assert prong_ext.__version__ == _version.__version__
    literal = re.compile(r"""(__version__|\bversion)\s*=\s*["']\d""")
    files = [ROOT / "setup.py", ROOT / "pyproject.toml", *sorted((ROOT / "prong_ext").rglob("*.py"))]
    defining = [str(f.relative_to(ROOT)) for f in files if literal.search(f.read_text())]
    assert defining == ["prong_ext/_version.py"]
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()


def test_license_is_bsd_3_clause():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, the prong_ext developers" in text
    assert "Neither the name of the copyright holder" in text
