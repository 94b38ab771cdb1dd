"""The three SSD forms agree: sequential recurrence (ground truth) == chunked == quadratic."""

import pytest
import torch
import torch.nn.functional as F

from bsmamba2.ssd import segment_decay, ssd_chunked, ssd_quadratic, ssd_sequential


def random_inputs(b, l, h, p, g, n, dtype=torch.float64, requires_grad=False, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else l * 7919 + h)
    x = torch.randn(b, l, h, p, dtype=dtype, generator=gen)
    dt = F.softplus(torch.randn(b, l, h, dtype=dtype, generator=gen) - 1.0)
    A = -(0.05 + 2 * torch.rand(h, dtype=dtype, generator=gen))
    B = torch.randn(b, l, g, n, dtype=dtype, generator=gen)
    C = torch.randn(b, l, g, n, dtype=dtype, generator=gen)
    D = torch.randn(h, dtype=dtype, generator=gen)
    tensors = [x, dt, A, B, C, D]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors


@pytest.mark.parametrize("length", [1, 7, 255, 256, 257, 801])
@pytest.mark.parametrize("chunk_size", [16, 64, 256])
def test_chunked_equals_sequential_float64(length, chunk_size):
    x, dt, A, B, C, D = random_inputs(2, length, 4, 3, 2, 5)
    ref = ssd_sequential(x, dt, A, B, C, D)
    out = ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("length", [1, 7, 62, 255, 257])
def test_quadratic_equals_sequential_float64(length):
    x, dt, A, B, C, D = random_inputs(1, length, 4, 3, 1, 6)
    torch.testing.assert_close(ssd_quadratic(x, dt, A, B, C, D), ssd_sequential(x, dt, A, B, C, D),
                               rtol=0, atol=1e-10)


def test_final_state_and_initial_state_continue_a_sequence():
    """Scanning [a; b] equals scanning a, then b from a's final state (what streaming relies on)."""
    x, dt, A, B, C, D = random_inputs(2, 300, 4, 3, 2, 5)
    full = ssd_chunked(x, dt, A, B, C, D, chunk_size=64)
    ya, state = ssd_chunked(x[:, :123], dt[:, :123], A, B[:, :123], C[:, :123], D, chunk_size=64,
                            return_final_state=True)
    yb = ssd_chunked(x[:, 123:], dt[:, 123:], A, B[:, 123:], C[:, 123:], D, chunk_size=64, initial_state=state)
    torch.testing.assert_close(torch.cat([ya, yb], 1), full, rtol=0, atol=1e-10)
    _, seq_state = ssd_sequential(x, dt, A, B, C, D, return_final_state=True)
    _, chunk_state = ssd_chunked(x, dt, A, B, C, D, chunk_size=64, return_final_state=True)
    torch.testing.assert_close(chunk_state, seq_state, rtol=0, atol=1e-10)


def test_gradients_chunked_vs_sequential():
    ins_a = random_inputs(1, 70, 2, 3, 1, 4, requires_grad=True, seed=3)
    ins_b = [t.detach().clone().requires_grad_(True) for t in ins_a]
    weight = torch.randn(1, 70, 2, 3, dtype=torch.float64)
    (ssd_sequential(*ins_a) * weight).sum().backward()
    (ssd_chunked(*ins_b, chunk_size=16) * weight).sum().backward()
    for a, b in zip(ins_a, ins_b):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-9)


def test_float32_and_bf16_inputs_keep_float32_decays():
    x, dt, A, B, C, D = random_inputs(1, 100, 2, 4, 1, 8, dtype=torch.float32)
    ref = ssd_sequential(*(t.double() for t in (x, dt, A, B, C, D)))
    out32 = ssd_chunked(x, dt, A, B, C, D, chunk_size=32)
    assert out32.dtype == torch.float32
    assert ((out32.double() - ref).norm() / ref.norm()) < 1e-5
    out16 = ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), D, chunk_size=32)
    assert out16.dtype == torch.bfloat16
    assert ((out16.double() - ref).norm() / ref.norm()) < 2e-2


def test_segment_decay_is_lower_triangular_products():
    a = -torch.rand(5, dtype=torch.float64)
    L = segment_decay(a)
    for i in range(5):
        for j in range(5):
            expected = torch.exp(a[j + 1:i + 1].sum()) if i >= j else torch.tensor(0.0, dtype=torch.float64)
            torch.testing.assert_close(L[i, j], expected)
