"""decompose/ at world size 1 (a group of one), float64, against dense references: tsqr against
torch.linalg.qr with diag(R) >= 0; split_svd's niter=K mode against Halko's algorithm written
out densely from the same start (the scheme of torch.svd_lowrank(q=k, niter=K), which PEFT's
"pissa_niter_K" calls); the converging mode against a full SVD, and its report when the top-k
subspace is not defined (tied singular values).  Multi-rank behaviour: tests/distributed/
test_decomposition_init.py."""
import torch

from parallel_adapters.decompose import svd
from parallel_adapters.decompose.tsqr import tsqr
from parallel_adapters.distributed.groups import GROUP_OF_ONE

F64 = torch.float64


def _matrix(m, n, spectrum, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64)).Q
    return (u * torch.tensor(spectrum, dtype=F64)) @ v.T


def test_tsqr_is_the_qr_with_a_nonnegative_diagonal():
    y = torch.randn(20, 6, dtype=F64)
    q, r = tsqr(y, GROUP_OF_ONE)
    assert (torch.diagonal(r) >= 0).all() and torch.allclose(q @ r, y, atol=1e-13)
    q_ref, r_ref = torch.linalg.qr(y)
    d = torch.sign(torch.diagonal(r_ref))
    assert torch.allclose(q, q_ref * d, atol=1e-13) and torch.allclose(r, r_ref * d[:, None], atol=1e-13)


def test_niter_mode_is_halko_from_the_same_start():
    a = torch.randn(30, 20, dtype=F64)
    omega = torch.randn(20, 4, dtype=F64)
    out = svd.split_svd(a, 4, omega, GROUP_OF_ONE, niter=2)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(2):
        q = torch.linalg.qr(a @ torch.linalg.qr(a.T @ q).Q).Q
    u_b, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    assert torch.allclose(out.s, s, atol=1e-12)
    assert torch.allclose((out.u_local * out.s) @ out.v.T, (q @ u_b * s) @ vh, atol=1e-12)
    assert out.iterations == 2 and out.converged


def test_exact_mode_converges_to_the_full_svd():
    a = _matrix(40, 25, [5.0, 4.0, 3.9, 2.0] + [1.9 * 0.97 ** i for i in range(21)])  # full rank, slow decay
    k = 4
    out = svd.split_svd(a, k, torch.randn(25, svd.block_size(k, 40, 25, None), dtype=F64), GROUP_OF_ONE)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    assert out.converged and out.iterations > 3
    assert torch.allclose(out.s, s[:k], atol=1e-12)
    assert torch.allclose((out.u_local * out.s) @ out.v.T, (u[:, :k] * s[:k]) @ vh[:k], atol=1e-10)


def test_exact_mode_reports_a_top_k_subspace_that_is_not_defined():
    a = _matrix(40, 25, [3.0, 2.0, 2.0, 2.0, 2.0] + [1.999] * 10)  # sigma_2 = sigma_3: no top-2 subspace
    out = svd.split_svd(a, 2, torch.randn(25, 2, dtype=F64), GROUP_OF_ONE, max_iters=5)
    assert not out.converged and out.iterations == 5 and out.distance > 1e-6


def test_largest_entry_signs():
    v = torch.tensor([[0.1, -0.9], [-0.8, 0.2], [0.3, 0.9]], dtype=F64)  # column 2: a tie, lowest row wins
    signs = svd.largest_entry_signs(v, torch.arange(3), GROUP_OF_ONE)
    assert signs.tolist() == [-1.0, -1.0]
