import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# The scripts check that re-whitening keeps the model's function up to float32 rounding: before
# and after each within helpers.RoundingBound (before, at U = I and c = 0, has terms no larger
# than after), and each re-whitening's float64 V, d, U and c rounded to float32, 4 roundings of
# the layers' terms (the float64 projection's own error is far below one).
KEPT = """
import sys
sys.path.insert(0, TESTS)
from helpers import RoundingBound
bound = 2 * RoundingBound(model, x, extra={m: 4 * REWHITENINGS for m in prong.layers.values()}).err
assert ((model(x) - before).detach().double().abs() <= bound).all()
"""


def _kept(rewhitenings: int) -> str:
    tests = repr(str(Path(__file__).resolve().parent))
    return KEPT.replace("TESTS", tests).replace("REWHITENINGS", str(rewhitenings))


def test_package_works_without_the_compiled_extension_and_says_so_once():
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["prong_ext._C"] = None  # as if it had not been built
        import torch, prong_ext
        from torch import nn
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = prong_ext.whiten(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
            x = torch.randn(32, 4)
            before = model(x)
            prong = prong_ext.Prong(model, num_samples=32)
            prong.reparametrize(x)
            prong.reparametrize(x)
            KEPT
        messages = [str(w.message) for w in caught if "prong_ext._C" in str(w.message)]
        print(len(messages))
        """
    ).replace("KEPT", textwrap.indent(_kept(2), " " * 4).strip())
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1", out.stdout + out.stderr


def _skip_without_compiled_extension():
    if importlib.util.find_spec("prong_ext._C") is None:
        pytest.skip("prong_ext._C is not built")


def test_build_records_the_torch_the_extension_was_compiled_against():
    _skip_without_compiled_extension()
    import torch

    from prong_ext import _build_info, _extension

    assert _build_info.torch_version == torch.__version__
    assert _extension.available()
    assert _build_info.cuda_version == (torch.version.cuda if _extension.cuda_built() else None)


def test_another_torch_is_named_in_one_warning_and_the_torch_path_is_used():
    _skip_without_compiled_extension()
    script = textwrap.dedent(
        """
        import warnings
        import torch
        built = torch.__version__
        torch.__version__ = "2.99.0+elsewhere"  # as if torch had been upgraded after the build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import prong_ext
            from prong_ext import _extension
            from torch import nn
            assert not _extension.available() and _extension._C is None
            model = prong_ext.whiten(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
            x = torch.randn(32, 4) @ torch.randn(4, 4)
            before = model(x)
            prong = prong_ext.Prong(model, num_samples=32)
            prong.reparametrize(x)
            KEPT
            assert prong_ext.ops.batched_eigh([torch.eye(3)])[0][0].tolist() == [1.0, 1.0, 1.0]
        messages = [str(w.message) for w in caught if "prong_ext._C" in str(w.message)]
        assert len(messages) == 1, messages
        print(built)
        print(messages[0])
        """
    ).replace("KEPT", textwrap.indent(_kept(1), " " * 4).strip())
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    built, message = out.stdout.strip().split("\n", 1)
    assert f"built against torch {built}" in message, message
    assert "torch 2.99.0+elsewhere is installed" in message, message
    assert "pip install --no-build-isolation ." in message, message
