"""SSA-Net (Wang et al., Medical Image Analysis 2022): the one definition of the network.

Layout in the shape of segmentation_models_pytorch: an encoder returns its stage
features, the bottleneck applies the spatial convolution, a LinkNet-style decoder
consumes the features, and a head maps to classes.

- Encoder: ResNet34 (3, 4, 6, 3 basic blocks), trained from scratch (no ImageNet here).
- Self-attention distillation (SAD) needs the four stage outputs: ``forward(x,
  return_attention=True)`` returns them; the loss lives in :mod:`ssanet.losses`.
- Spatial convolution (SCNN-style message passing) on the stage-4 map.
- Decoder: four LinkNet blocks (1x1 conv, 3x3 transposed conv stride 2, 1x1 conv) with
  additive skip connections, then a final upsampling head back to the input size.

Table 3 ablation variants: ``SSANet(spatial_conv=False, sad=False)`` is the backbone,
``sad=True`` adds SA (the flag only records that the model is trained with SAD; the
architecture is unchanged), ``spatial_conv=True`` adds SC.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
import torch.nn.functional as F

RESNET34_LAYERS = (3, 4, 6, 3)
STAGE_CHANNELS = (64, 128, 256, 512)


@dataclass
class SSANetConfig:
    """Everything needed to rebuild the architecture; stored in every checkpoint."""

    in_channels: int = 2
    num_classes: int = 3
    spatial_conv: bool = True
    sad: bool = True
    layers: tuple = RESNET34_LAYERS
    sc_kernel_size: int = 9
    width: tuple = field(default=STAGE_CHANNELS)
    sc_bound: bool = True

    # Checkpoints written before ``sc_bound`` existed hold unbounded spatial convolutions.
    LEGACY_DEFAULTS = {"sc_bound": False}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["width"] = list(self.width)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SSANetConfig":
        known = {k: d[k] if k in d else cls.LEGACY_DEFAULTS[k] for k in cls.__dataclass_fields__
                 if k in d or k in cls.LEGACY_DEFAULTS}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown SSA-Net config keys: {sorted(unknown)}")
        for k in ("layers", "width"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


def _conv_bn_relu(cin, cout, k, stride=1, padding=0):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity, inplace=True)


class ResNetEncoder(nn.Module):
    """ResNet stem + four residual stages; returns the four stage outputs (strides 4..32)."""

    def __init__(self, in_channels=2, layers=RESNET34_LAYERS, width=STAGE_CHANNELS):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(width[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [], width[0]
        for i, (n, cout) in enumerate(zip(layers, width)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(width)

    def forward(self, x):
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class SpatialConv(nn.Module):
    """SCNN message passing: rows (or columns) updated in sequence, in four directions.

    For the "down" pass over rows r_0..r_{H-1}: out[0] = in[0],
    out[i] = in[i] + ReLU(conv(out[i-1])) with a 1 x k kernel over all channels; "up" is the
    same from the bottom row, "right"/"left" over columns with a k x 1 kernel. Each direction
    has its own kernel and they are applied one after the other (down, up, right, left), so
    information from any pixel can reach every other pixel. Built out of place (lists +
    ``torch.cat``) so autograd sees every step.

    ``bound=True`` (the default for new models) caps each kernel's gain at 1: the weight is
    divided by ``max(1, sqrt(k) * sigma)``, sigma the largest singular value of the kernel
    reshaped to (C_out, C_in * k), estimated by power iteration as in spectral
    normalisation. A 1 x k convolution of a row then cannot enlarge it (its operator norm
    is at most sqrt(k) * sigma), so the recursion grows at most additively. Without the cap
    the trained kernels amplified each step about 7x: after the 4 x 8 sequential steps of a
    256-pixel input the stage-4 map reached 1e21, the BatchNorm after it overflowed to an
    infinite running variance, and at inference the bottleneck path was silent.
    ``bound=False`` is the plain formula (checkpoints from before the cap).
    """

    DIRECTIONS = ("down", "up", "right", "left")

    def __init__(self, channels: int, kernel_size: int = 9, bound: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("spatial convolution kernel size must be odd")
        p = kernel_size // 2
        self.bound = bool(bound)
        self.convs = nn.ModuleDict({
            "down": nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, p), bias=False),
            "up": nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, p), bias=False),
            "right": nn.Conv2d(channels, channels, (kernel_size, 1), padding=(p, 0), bias=False),
            "left": nn.Conv2d(channels, channels, (kernel_size, 1), padding=(p, 0), bias=False),
        })
        if self.bound:
            g = torch.Generator().manual_seed(0)
            for d in self.DIRECTIONS:  # power-iteration state; rebuilt on load (not saved)
                self.register_buffer(f"_u_{d}", F.normalize(torch.randn(channels, generator=g), dim=0),
                                     persistent=False)

    def kernel(self, direction: str) -> torch.Tensor:
        """The weight the pass uses: capped at gain 1 when ``bound``, else the raw kernel.

        Training refines a running power-iteration estimate of sigma by one step per
        forward (as spectral normalisation does); evaluation uses the exact value, computed
        once per weight version and cached.
        """
        w = self.convs[direction].weight
        if not self.bound:
            return w
        if self.training:
            return self._capped(w, self._sigma_estimate(direction, w))
        key = (direction, w.data_ptr(), w._version, w.device, w.dtype)
        cache = self.__dict__.setdefault("_kernel_cache", {})
        if key not in cache:
            if len(cache) > 8:
                cache.clear()
            with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
                sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1).float(), ord=2)
                cache[key] = self._capped(w, sigma).contiguous()
        return cache[key]

    @staticmethod
    def _capped(w, sigma):
        k = w.shape[2] * w.shape[3]
        return w / torch.clamp(sigma * k ** 0.5, min=1.0).to(w.dtype)

    def _sigma_estimate(self, direction, w):
        """One power-iteration step on the running vector; differentiable in ``w``."""
        with torch.autocast(w.device.type, enabled=False):  # sigma in float32 under AMP
            mat = w.reshape(w.shape[0], -1).float()
            u = getattr(self, f"_u_{direction}")
            with torch.no_grad():
                v = F.normalize(mat.t() @ u, dim=0)
                u.copy_(F.normalize(mat @ v, dim=0))
            return torch.dot(u.clone(), mat @ v)  # clone: later forwards update u in place

    @staticmethod
    def _pass(x, conv, weight, dim, reverse):
        slices = list(torch.split(x, 1, dim=dim))
        order = range(len(slices) - 1, -1, -1) if reverse else range(len(slices))
        out = [None] * len(slices)
        prev = None
        for i in order:
            cur = slices[i] if prev is None else slices[i] + F.relu(
                F.conv2d(prev, weight, None, conv.stride, conv.padding))
            out[i] = cur
            prev = cur
        return torch.cat(out, dim=dim)

    def forward(self, x):
        # The passes run on contiguous (NCHW) rows: with channels_last tensors (the CPU
        # inference layout) each of the 64 small row convolutions converts layouts, which
        # measured 1.5-2.6x slower on the 16x16 stage-4 map of a 512-pixel slice.
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        x = x.contiguous()
        for d, dim, reverse in (("down", 2, False), ("up", 2, True), ("right", 3, False), ("left", 3, True)):
            x = self._pass(x, self.convs[d], self.kernel(d).contiguous(), dim, reverse)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class LinkNetDecoderBlock(nn.Module):
    """1x1 conv (C -> C/4), 3x3 transposed conv stride 2, 1x1 conv (C/4 -> out)."""

    def __init__(self, cin, cout):
        super().__init__()
        mid = cin // 4
        self.reduce = _conv_bn_relu(cin, mid, 1)
        self.up = nn.Sequential(
            nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )
        self.expand = _conv_bn_relu(mid, cout, 1)

    def forward(self, x):
        return self.expand(self.up(self.reduce(x)))


class LinkNetDecoder(nn.Module):
    """Four decoder blocks; stage skips are added (LinkNet), ending at stride 2."""

    def __init__(self, encoder_channels=STAGE_CHANNELS):
        super().__init__()
        c1, c2, c3, c4 = encoder_channels
        self.blocks = nn.ModuleList([
            LinkNetDecoderBlock(c4, c3),
            LinkNetDecoderBlock(c3, c2),
            LinkNetDecoderBlock(c2, c1),
            LinkNetDecoderBlock(c1, c1),
        ])

    def forward(self, feats):
        e1, e2, e3, e4 = feats
        d = self.blocks[0](e4) + e3
        d = self.blocks[1](d) + e2
        d = self.blocks[2](d) + e1
        return self.blocks[3](d)


class SegmentationHead(nn.Sequential):
    """Stride 2 -> full size: transposed conv, conv, 1x1 to classes (as in LinkNet)."""

    def __init__(self, cin, num_classes):
        super().__init__(
            nn.ConvTranspose2d(cin, 32, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, num_classes, 1),
        )


class SSANet(nn.Module):
    """SSA-Net. ``forward(x)`` -> logits (N, C, H, W); H and W must be divisible by 32.

    ``num_classes=1`` is the binary infection model (sigmoid), ``num_classes>=2`` is
    multi-class with background as class 0 (softmax). See :func:`probabilities`.
    """

    def __init__(self, in_channels=2, num_classes=3, spatial_conv=True, sad=True,
                 layers=RESNET34_LAYERS, sc_kernel_size=9, width=STAGE_CHANNELS, sc_bound=True):
        super().__init__()
        self.config = SSANetConfig(in_channels, num_classes, spatial_conv, sad,
                                   tuple(layers), sc_kernel_size, tuple(width), bool(sc_bound))
        self.encoder = ResNetEncoder(in_channels, layers, width)
        self.spatial_conv = SpatialConv(width[-1], sc_kernel_size, sc_bound) if spatial_conv else None
        self.decoder = LinkNetDecoder(width)
        self.head = SegmentationHead(width[0], num_classes)

    @classmethod
    def from_config(cls, config: SSANetConfig | dict) -> "SSANet":
        if isinstance(config, dict):
            config = SSANetConfig.from_dict(config)
        return cls(config.in_channels, config.num_classes, config.spatial_conv, config.sad,
                   config.layers, config.sc_kernel_size, config.width, config.sc_bound)

    def forward(self, x, return_attention: bool = False):
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"SSA-Net input height and width must be divisible by 32, got {h}x{w}")
        feats = self.encoder(x)
        stage_maps = list(feats)
        if self.spatial_conv is not None:
            feats = feats[:3] + [self.spatial_conv(feats[3])]
        logits = self.head(self.decoder(feats))
        if return_attention:
            return logits, stage_maps
        return logits


class SSANetEnsemble(nn.Module):
    """Several SSA-Nets of one architecture whose class probabilities are averaged.

    ``forward(x)`` returns scores whose :func:`probabilities` are the members' mean
    probabilities (the log of the mean for multi-class, its logit for binary), so the
    predictor, evaluation, the CT pipeline and Slicer run an ensemble like one network.
    Inference only: it has no attention maps to distil and cannot be trained as a whole.
    """

    def __init__(self, members):
        super().__init__()
        members = list(members)
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two networks")
        if any(m.config != members[0].config for m in members[1:]):
            raise ValueError("the networks of an ensemble must share one architecture config")
        self.config = members[0].config
        self.members = nn.ModuleList(members)

    def forward(self, x):
        mean = torch.stack([probabilities(m(x).float()) for m in self.members]).mean(0)
        if self.config.num_classes == 1:
            return torch.logit(mean[:, 1:], eps=1e-7)
        return torch.log(mean.clamp_min(1e-12))


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities including background as channel 0, for binary and multi-class."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, size: int = 512) -> int:
    """Multiply-accumulates x 2 of one forward pass of a (1, C, size, size) input.

    Counted with forward hooks on every convolution / transposed convolution, which carry
    essentially all of SSA-Net's arithmetic (BN, ReLU and additions are ignored, as in
    the usual FLOP tables).
    """
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, SpatialConv):  # its row convolutions run through F.conv2d
            n, c, h, w = inp[0].shape
            k = mod.convs["down"].kernel_size[1]
            total += 2 * 2 * n * c * c * k * ((h - 1) * w + (w - 1) * h)
            return
        kernel = mod.kernel_size[0] * mod.kernel_size[1]
        if isinstance(mod, nn.ConvTranspose2d):
            # every input value is scattered into a kernel-sized patch of each output channel
            total += 2 * inp[0].numel() * kernel * mod.out_channels // mod.groups
        else:
            total += 2 * out.numel() * kernel * mod.in_channels // mod.groups

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, SpatialConv))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, model.config.in_channels, size, size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
