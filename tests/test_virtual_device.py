"""The virtual-device harness (tests/virtual_device.py) itself: it must reject what CUDA rejects,
accept what CUDA accepts, and compute the values a plain CPU run computes."""

import threading

import numpy as np
import pytest
import torch

from virtual_device import VIRTUAL, DevicePlacementError, VirtualTensor, is_virtual, virtual_device


@pytest.fixture
def vd():
    with virtual_device() as mode:
        yield mode


def test_factories_with_device_meta_hold_real_values(vd):
    x = torch.arange(6, device=VIRTUAL).reshape(2, 3)
    assert is_virtual(x) and x.device == VIRTUAL and x.dtype == torch.int64
    assert isinstance(x, VirtualTensor) and type(x.inner) is torch.Tensor and x.inner.device.type == "cpu"
    assert x.sum().item() == 15
    assert is_virtual(torch.zeros(3, device="meta")) and is_virtual(torch.eye(2, device=VIRTUAL))
    t = torch.tensor([1.5, 2.5], device="meta")  # built below the dispatcher by torch: patched
    assert is_virtual(t) and t.cpu().tolist() == [1.5, 2.5]
    a = torch.as_tensor(np.array([1.0, 2.0]), device=VIRTUAL)
    assert is_virtual(a) and float(a.sum()) == 3.0


def test_cpu_tensor_mixed_with_virtual_is_rejected(vd):
    x = torch.ones(3, device=VIRTUAL)
    with pytest.raises(DevicePlacementError, match=r"aten\.add\.Tensor.*'self'.*device 'cpu', shape \(3,\)"):
        torch.zeros(3) + x


def test_cpu_scalar_tensor_outside_elementwise_ops_is_rejected(vd):
    x = torch.ones((), device=VIRTUAL)
    with pytest.raises(DevicePlacementError, match=r"aten\.stack.*0-dim"):
        torch.stack([x, torch.tensor(2.0)])  # CUDA: 'Expected all tensors to be on the same device'


def test_cpu_identity_times_virtual_weights_is_rejected(vd):
    W = torch.randn(4, 4).to(VIRTUAL)
    with pytest.raises(DevicePlacementError, match=r"aten\.mm.*'self'.*shape \(4, 4\)"):
        torch.eye(4) @ W
    assert is_virtual(torch.eye(4, device=W.device, dtype=W.dtype) @ W)


def test_cpu_generator_drawing_on_the_virtual_device_is_rejected(vd):
    expected = "Expected a 'meta' device type for generator but found 'cpu'"
    with pytest.raises(DevicePlacementError, match=expected):
        torch.randn(3, 4, generator=torch.Generator().manual_seed(0), device=VIRTUAL)
    with pytest.raises(DevicePlacementError, match="generator"):
        torch.randperm(5, generator=torch.Generator(), device=VIRTUAL)
    with pytest.raises(DevicePlacementError, match="generator"):
        torch.ones(3, device=VIRTUAL).normal_(generator=torch.Generator())
    # and the reverse: a device generator drawing on the CPU
    expected = "Expected a 'cpu' device type for generator but found 'meta'"
    with pytest.raises(DevicePlacementError, match=expected):
        torch.randn(3, generator=torch.Generator(device=VIRTUAL))


def test_the_correct_idioms_are_accepted(vd):
    expected = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    # draw on the CPU, then move
    moved = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(VIRTUAL)
    assert is_virtual(moved) and torch.equal(moved.cpu(), expected)
    # a generator on the device itself
    on_device = torch.randn(3, 4, generator=torch.Generator(device=VIRTUAL).manual_seed(0), device=VIRTUAL)
    assert is_virtual(on_device)
    # what CUDA allows: 0-dim CPU tensors, CPU index tensors and masks, cross-device copies
    x = torch.arange(5.0, device=VIRTUAL)
    assert is_virtual(x * torch.tensor(2.0))
    assert is_virtual(x.clone().masked_fill_(x > 2, torch.tensor(0.0)))
    assert x[torch.tensor([4, 0])].cpu().tolist() == [4.0, 0.0]
    x[torch.tensor([True, False, False, False, True])] = 7.0
    assert x.cpu().tolist() == [7.0, 1.0, 2.0, 3.0, 7.0]
    host = torch.zeros(5)
    host.copy_(x)
    assert type(host) is torch.Tensor and host.tolist() == [7.0, 1.0, 2.0, 3.0, 7.0]
    with torch.autocast("meta", enabled=False):  # a bare meta autocast raises; CUDA's does not
        assert is_virtual(x + 1)


def _small_model(device):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 4, generator=g).to(device).requires_grad_()
    b = torch.zeros(4, device=device).requires_grad_()
    x = torch.randn(8, 6, generator=g).to(device)
    h = torch.relu(x @ W + b)
    top = h.topk(2, dim=1)
    kept = torch.zeros_like(h).scatter(1, top.indices, top.values)
    active = kept[kept.sum(1) > 0]  # boolean indexing: data-dependent shape
    loss = (active - 0.5).pow(2).mean() + 0.1 * W.abs().sum()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([W, b], 0.5)
    return loss.item(), W.grad.cpu(), b.grad.cpu(), float(norm), active.shape


def test_values_and_gradients_equal_a_plain_cpu_run():
    expected = _small_model("cpu")
    with virtual_device():
        got = _small_model(VIRTUAL)
    assert got[0] == expected[0] and got[3] == expected[3] and got[4] == expected[4]
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(factor)
        return x * factor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (factor,) = ctx.saved_tensors
        return grad * factor, None


class _HostGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return torch.full(grad.shape, 2.0)  # on the CPU: CUDA's engine rejects this


def test_custom_autograd_functions(vd):
    x = torch.arange(3.0, device=VIRTUAL).requires_grad_()
    _Scale.apply(x, torch.full((3,), 3.0, device=VIRTUAL)).sum().backward()
    assert is_virtual(x.grad) and x.grad.cpu().tolist() == [3.0, 3.0, 3.0]
    y = torch.arange(3.0, device=VIRTUAL).requires_grad_()
    with pytest.raises(DevicePlacementError, match="invalid gradient at index 0"):
        _HostGradient.apply(y).sum().backward()


def test_in_place_and_out_ops_return_the_same_wrapper(vd):
    x = torch.zeros(2, 3, device=VIRTUAL)
    assert x.add_(1) is x and x.mul_(torch.tensor(2.0)) is x
    out = torch.empty(2, 3, device=VIRTUAL)
    assert torch.mul(x, 3, out=out) is out and out.cpu().sum().item() == 36.0
    row = x[1]  # a view: writes reach the base
    assert is_virtual(row) and row._base is x
    row.fill_(5)
    assert x.cpu()[1].tolist() == [5.0, 5.0, 5.0]


def test_host_read_outs(vd):
    x = torch.tensor([[1.0, -2.0]], device=VIRTUAL)
    with pytest.raises(TypeError, match="numpy"):
        x.numpy()
    with pytest.raises(TypeError, match="numpy"):
        np.asarray(x)
    host = x.cpu()
    assert type(host) is torch.Tensor and host.device.type == "cpu" and host.tolist() == [[1.0, -2.0]]
    assert type(x.to("cpu")) is torch.Tensor
    s = x.sum()
    assert s.item() == -1.0 and float(s) == -1.0 and bool(s < 0) and int(s) == -1 and f"{s:.1f}" == "-1.0"


def test_strict_dtype_flags_float32_in_float64_work():
    host32 = np.ones(3, dtype=np.float32)
    with virtual_device(strict_dtype=torch.float64):
        w = torch.ones(3, device=VIRTUAL, dtype=torch.float64)
        assert float((w * w.to(torch.float32).double()).sum()) == 3.0  # explicit casts are fine
        with pytest.raises(DevicePlacementError, match=r"strict_dtype=torch\.float64.*float32"):
            w * torch.ones(3, device=VIRTUAL)  # the default float32
        with pytest.raises(DevicePlacementError, match="strict_dtype"):
            w + torch.from_numpy(host32).to(VIRTUAL)  # a host float32 array moved without dtype=
        # a dtype chosen on purpose (dtype=, .float()) is let through by default...
        fraction = (w > 0).float().mean()
        assert float(fraction) == 1.0
        assert float(torch.zeros(3, device=VIRTUAL, dtype=torch.float32).sum()) == 0.0
    # ... and flagged without allow_explicit_dtypes
    with virtual_device(strict_dtype=torch.float64, allow_explicit_dtypes=False):
        w = torch.ones(3, device=VIRTUAL, dtype=torch.float64)
        with pytest.raises(DevicePlacementError, match=r"aten\.mean"):
            (w > 0).float().mean()
    with virtual_device():
        w = torch.ones(3, device=VIRTUAL, dtype=torch.float64)
        assert (w * torch.ones(3, device=VIRTUAL)).dtype == torch.float64  # off: type promotion


def test_worker_threads_do_not_see_the_mode(vd):
    x = torch.ones(3, device=VIRTUAL)
    seen = {}

    def work():
        try:
            seen["sum"] = (x * 2).sum().item()  # VirtualTensor dispatch: still works
            seen["z"] = torch.zeros(3, device=VIRTUAL)  # no mode here: a real meta tensor
            x + seen["z"]
        except DevicePlacementError as exc:
            seen["error"] = str(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen["sum"] == 6.0 and not is_virtual(seen["z"])
    assert "REAL meta" in seen["error"]


def test_patches_are_restored():
    real = (torch.Generator, torch.autocast, torch.tensor)
    with virtual_device():
        assert torch.Generator is not real[0]
        assert isinstance(real[0](), torch.Generator)
        assert isinstance(torch.Generator(device=VIRTUAL), torch.Generator)
    assert (torch.Generator, torch.autocast, torch.tensor) == real
    x = torch.ones(2, device=VIRTUAL)  # outside: a plain meta tensor again
    assert type(x) is torch.Tensor and not is_virtual(x)
