"""Smoke test of an installed fastmix wheel (scripts/dist_check.sh runs it from outside the source tree).

    python dist_smoke.py VENV SOURCE_ROOT

Checks that `import fastmix` comes from VENV (not the checkout), that the extension records the torch it was
built against and is stripped, that the CPU kernels pick a capability this CPU runs, and that one frontend
call (forward and backward) matches the pure-PyTorch reference.
"""
import os
import subprocess
import sys

venv, source_root = (os.path.realpath(p) for p in sys.argv[1:3])
if os.path.realpath(os.getcwd()).startswith(source_root + os.sep):
    sys.exit("dist_smoke.py must run outside the source tree")

import torch  # noqa: E402

import fastmix  # noqa: E402
from fastmix import _backend, _build_info  # noqa: E402

where = os.path.realpath(fastmix.__file__)
assert where.startswith(venv + os.sep), f"fastmix imported from {where}, not from the wheel installed in {venv}"
ext = _backend.cpu_extension()
assert ext is not None, f"fastmix._C did not load{_backend.extension_error('fastmix._C')}"
assert _build_info.TORCH_VERSION == str(torch.__version__), (_build_info.TORCH_VERSION, torch.__version__)
so = ext.__file__
size_mb = os.path.getsize(so) / 2**20
kind = subprocess.run(["file", "-b", so], capture_output=True, text=True).stdout if os.path.exists("/usr/bin/file") else ""
assert "not stripped" not in kind, f"{so} is not stripped: {kind}"

cap = fastmix.cpu_capability()
caps = _backend.cpu_capabilities()
assert caps[cap] and cap == next(n for n, ok in caps.items() if ok), (cap, caps)
assert "cpu" in fastmix.available_backends()

torch.manual_seed(0)
x = (torch.rand(3, 3, 16, 12, dtype=torch.float64) * 2 - 1).requires_grad_()
index = torch.tensor([[0, 1], [2, 0], [1, 1]])
weight = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.3, 0.7]], dtype=torch.float64, requires_grad=True)


def run(backend):
    os.environ["FASTMIX_BACKEND"] = backend
    try:
        y = fastmix.frontend(x, upsample=2, index=index, weight=weight, seed=5)
        gx, gw = torch.autograd.grad(y.square().sum(), (x, weight))
        return y, gx, gw
    finally:
        del os.environ["FASTMIX_BACKEND"]


got, ref = run("cpu"), run("torch")
err = max((g - r).abs().max().item() / r.abs().max().item() for g, r in zip(got, ref))
assert err < 1e-12, f"frontend on the cpu backend differs from the reference: relative error {err}"
print(f"[fastmix dist] smoke passed: fastmix {fastmix.__version__} from {os.path.dirname(where)}, built against torch "
      f"{_build_info.TORCH_VERSION}, _C {size_mb:.1f} MiB ({kind.split(',')[-1].strip() or 'stripped'}), "
      f"cpu capability {cap} of {list(caps)}, frontend fwd+bwd vs reference: relative error {err:.1e}", file=sys.stderr)
