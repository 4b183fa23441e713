import subprocess
import sys
import textwrap


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
            assert torch.allclose(model(x), before, atol=1e-5)
        messages = [str(w.message) for w in caught if "prong_ext._C" in str(w.message)]
        print(len(messages))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1", out.stdout + out.stderr
