import pytest
import torch

# Unit roundoff of each dtype: the tolerances below are multiples of it.
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(got, ref):
    got = got.double()
    ref = ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(got, ref, dtype, k, name, factor=4.0):
    """Relative L2 error within factor · eps(dtype) · sqrt(k) (k: the reduction length
    of the products behind the value), and at least a few output roundings."""
    tol = max(factor * EPS[dtype] * (k ** 0.5), 4 * EPS[dtype])
    err = rel_err(got, ref)
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.3e} ({dtype}, k={k})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
