"""SSA-Net architecture: shapes, spatial-convolution semantics and reach, ablation switches."""
import pytest
import torch
import torch.nn.functional as F

from ssanet.model import (SSANet, SpatialConv, count_flops, count_parameters, probabilities)

torch.set_num_threads(1)


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (128, 64)])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_output_shapes(size, num_classes):
    m = SSANet(2, num_classes).eval()
    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        logits, stages = m(x, return_attention=True)
    assert logits.shape == (2, num_classes, *size)
    h, w = size
    assert [tuple(s.shape) for s in stages] == [
        (2, 64, h // 4, w // 4), (2, 128, h // 8, w // 8), (2, 256, h // 16, w // 16), (2, 512, h // 32, w // 32)]
    p = probabilities(logits)
    assert p.shape == (2, max(2, num_classes), *size)
    assert torch.allclose(p.sum(1), torch.ones(2, *size), atol=1e-5)


def test_rejects_size_not_divisible_by_32():
    with pytest.raises(ValueError, match="divisible by 32"):
        SSANet()(torch.zeros(1, 2, 48, 64))


def _reference_spatial_conv(sc: SpatialConv, x):
    """Plain loop, written independently: out[0] = in[0], out[i] = in[i] + relu(conv(out[i-1]))."""
    x = x.clone()
    H, W = x.shape[2], x.shape[3]
    k = sc.convs["down"].kernel_size[1] // 2
    for name, rows, reverse in (("down", True, False), ("up", True, True), ("right", False, False), ("left", False, True)):
        wgt = sc.kernel(name)
        n = H if rows else W
        idx = list(range(n))[::-1] if reverse else list(range(n))
        out = x.clone()
        for j, i in enumerate(idx):
            if j == 0:
                continue
            prev = out[:, :, idx[j - 1]:idx[j - 1] + 1, :] if rows else out[:, :, :, idx[j - 1]:idx[j - 1] + 1]
            msg = F.relu(F.conv2d(prev, wgt, padding=(0, k) if rows else (k, 0)))
            if rows:
                out[:, :, i:i + 1, :] = x[:, :, i:i + 1, :] + msg
            else:
                out[:, :, :, i:i + 1] = x[:, :, :, i:i + 1] + msg
        x = out
    return x


@pytest.mark.parametrize("bound", [True, False])
def test_spatial_conv_equals_plain_loop(bound):
    torch.manual_seed(0)
    sc = SpatialConv(4, kernel_size=3, bound=bound).eval()
    x = torch.randn(2, 4, 5, 7)
    assert torch.allclose(sc(x), _reference_spatial_conv(sc, x), atol=1e-5)


def test_bounded_kernel_caps_gain_at_one_and_leaves_small_kernels_alone():
    torch.manual_seed(0)
    sc = SpatialConv(16, kernel_size=9).eval()
    for conv in sc.convs.values():
        torch.nn.init.normal_(conv.weight, std=1.0)  # gain far above 1
    for d in sc.DIRECTIONS:
        w = sc.kernel(d).reshape(16, -1)
        sigma = torch.linalg.matrix_norm(w, ord=2).item()
        assert sigma * 9 ** 0.5 == pytest.approx(1.0, rel=1e-3)
    small = SpatialConv(16, kernel_size=9).eval()
    for conv in small.convs.values():
        torch.nn.init.normal_(conv.weight, std=1e-4)
    assert torch.equal(small.kernel("down"), small.convs["down"].weight)


def test_bounded_spatial_conv_does_not_blow_up_where_the_plain_one_does():
    """The failure seen in training: kernels with gain > 1 compound over the sequential
    steps. With the cap each step adds at most the previous row's norm."""
    torch.manual_seed(0)
    x = torch.rand(1, 32, 16, 16)
    out = {}
    for bound in (True, False):
        sc = SpatialConv(32, kernel_size=9, bound=bound).eval()
        for conv in sc.convs.values():
            torch.nn.init.uniform_(conv.weight, 0.0, 0.2)  # positive, aligned: worst case
        with torch.no_grad():
            out[bound] = sc(x).abs().max().item()
    assert out[False] > 1e20
    # additive growth bound: at most (1 + 16) ** 4 times the input's largest row norm
    assert out[True] < 17 ** 4 * x.norm(dim=(1, 3)).max().item()
    assert out[True] < 1e6


def test_checkpoints_from_before_the_cap_load_unbounded():
    from ssanet.model import SSANetConfig

    legacy = SSANet(sc_bound=False).config.to_dict()
    legacy.pop("sc_bound")
    cfg = SSANetConfig.from_dict(legacy)
    assert cfg.sc_bound is False and SSANet.from_config(cfg).spatial_conv.bound is False
    assert SSANet().spatial_conv.bound is True
    # the cap adds no parameters and nothing to the state dict
    assert SSANet().state_dict().keys() == SSANet(sc_bound=False).state_dict().keys()


def test_spatial_conv_reach_and_gradients():
    torch.manual_seed(0)
    sc = SpatialConv(3, kernel_size=9)
    for conv in sc.convs.values():
        torch.nn.init.uniform_(conv.weight, 0.01, 0.05)  # positive so ReLU passes messages
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    y = sc(x)
    assert y.shape == x.shape
    # a change at one corner pixel must influence every output pixel
    x2 = x.detach().clone()
    x2[0, :, 0, 0] += 5.0
    diff = (sc(x2) - y.detach()).abs().sum(1)[0]
    assert (diff > 0).all()
    # out-of-place: autograd reaches the input from the far corner
    y[0, :, 15, 15].sum().backward()
    assert x.grad[0, :, 0, 0].abs().sum() > 0


def test_ablation_switches():
    backbone = SSANet(spatial_conv=False, sad=False)
    full = SSANet(spatial_conv=True, sad=True)
    assert backbone.spatial_conv is None and full.spatial_conv is not None
    sc_params = 4 * 512 * 512 * 9
    assert count_parameters(full) - count_parameters(backbone) == sc_params
    assert count_flops(full, 64) > count_flops(backbone, 64)
    # rebuilt from the stored config: the same architecture
    clone = SSANet.from_config(full.config.to_dict())
    assert count_parameters(clone) == count_parameters(full)


def test_flop_count_of_a_single_conv():
    m = SSANet(spatial_conv=False)
    f = count_flops(m, 64)
    # stem conv alone: 2 * (64 out ch * 32*32 px) * (7*7*2)
    assert f > 2 * 64 * 32 * 32 * 7 * 7 * 2


def test_flip_tta_averages_the_mirrored_prediction_and_follows_the_checkpoint():
    import numpy as np
    from ssanet.inference import Predictor

    torch.manual_seed(0)
    model = SSANet(num_classes=3).eval()
    x = np.random.default_rng(0).random((1, 2, 64, 64)).astype(np.float32)
    plain = Predictor(model, "cpu").predict(x)
    mirrored = Predictor(model, "cpu").predict(x[..., ::-1].copy())[..., ::-1]
    tta = Predictor(model, "cpu", flip_tta=True).predict(x)
    assert np.allclose(tta, 0.5 * (plain + mirrored), atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-4          # the mirrored pass really contributes
    assert Predictor.for_checkpoint(model, {"inference": {"flip_tta": True}}, "cpu").flip_tta
    assert not Predictor.for_checkpoint(model, {}, "cpu").flip_tta
    assert not Predictor.for_checkpoint(model, {"inference": {"flip_tta": True}}, "cpu", flip_tta=False).flip_tta


def test_cpu_bf16_autocast_only_when_asked_and_native(monkeypatch):
    import numpy as np
    import ssanet.inference as inf
    from ssanet.inference import Predictor

    torch.manual_seed(0)
    model = SSANet(num_classes=3).eval()
    x = np.random.default_rng(0).random((2, 2, 64, 64)).astype(np.float32)
    exact = Predictor(model, "cpu").predict(x)
    assert Predictor(model, "cpu").precision == "float32"
    # a CPU with native bf16: the forward passes run in bfloat16, close to float32 but not equal
    monkeypatch.setattr(inf, "autocast_dtype", lambda device, enabled: torch.bfloat16)
    fast = Predictor(model, "cpu", cpu_bf16=True)
    assert fast.precision == "bfloat16"
    approx = fast.predict(x)
    assert approx.dtype == np.float32 and approx.shape == exact.shape
    assert 0 < np.abs(approx - exact).max() < 0.05
    np.testing.assert_allclose(approx.sum(axis=1), 1.0, atol=1e-4)
    assert Predictor(model, "cpu", cpu_bf16=False).precision == "float32"
    # a CPU without it: float32, bit for bit
    monkeypatch.setattr(inf, "autocast_dtype", lambda device, enabled: None)
    plain = Predictor(model, "cpu", cpu_bf16=True)
    assert plain.precision == "float32"
    np.testing.assert_array_equal(plain.predict(x), exact)


def test_spatial_conv_same_result_and_layout_with_channels_last():
    """The passes run on NCHW rows whatever the input layout (faster on CPU); the result is
    the same and comes back in the caller's layout."""
    torch.manual_seed(0)
    sc = SpatialConv(16, kernel_size=3).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        ref = sc(x)
        sc = sc.to(memory_format=torch.channels_last)
        out = sc(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref)
