"""Speed and memory of the pipeline on a synthetic chest CT, and the cost of SSA-Net's
spatial convolution. Used by ``ssalesionseg bench`` and ``Testing/benchmarks/bench_pipeline.py``.

The synthetic CT (:func:`synthetic_chest_ct`) is also what the tests use: a body ellipse
of soft tissue with ribs, two lungs, a trachea on the upper slices and lesion blobs of
known size (GGO at -500 HU, consolidation at 0 HU).
"""
from __future__ import annotations

import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def synthetic_chest_ct(n_slices: int = 8, size: int = 512, spacing=(0.7, 0.7, 2.5), lesions: bool = True,
                       noise_hu: float = 12.0, seed: int = 0) -> tuple[sitk.Image, dict]:
    """(int16 HU image with identity direction, truth) where truth holds bool arrays (z, y, x):
    "right_lung", "left_lung" (including their lesions), "ggo", "consolidation"."""
    rng = np.random.default_rng(seed)
    sx, sy, sz = spacing
    nz = n_slices
    Y, X = np.mgrid[0:size, 0:size].astype(np.float32)
    X *= sx
    Y *= sy
    w, h = size * sx, size * sy
    cx, cy = w / 2, h / 2

    def ellipse(x0, y0, ax, ay):
        return ((X - x0) / ax) ** 2 + ((Y - y0) / ay) ** 2 <= 1.0

    body = ellipse(cx, cy, 0.42 * w, 0.33 * h)
    hu = np.full((nz, size, size), -1000.0, np.float32)
    truth = {k: np.zeros((nz, size, size), bool) for k in ("right_lung", "left_lung", "ggo", "consolidation")}
    ribs = np.zeros((size, size), bool)
    for side in (-1, 1):  # rib sections a few mm outside each lung's lateral wall
        for a in np.linspace(-0.45 * np.pi, 0.45 * np.pi, 7):
            rx = cx + side * (0.19 * w + (0.14 * w + 9.0) * np.cos(a))
            ry = cy + (0.22 * h + 9.0) * np.sin(a)
            ribs |= ellipse(rx, ry, 5.0, 5.0)
    for z in range(nz):
        t = (z + 0.5) / nz
        shrink = 0.75 + 0.25 * np.sin(np.pi * min(max(t, 0.05), 0.95))  # smaller at apex and base
        s = hu[z]
        s[body] = 40.0
        s[ribs & body] = 700.0
        # right lung on the patient's right = low column index (LPS)
        r = ellipse(cx - 0.19 * w, cy, 0.14 * w * shrink, 0.22 * h * shrink)
        l = ellipse(cx + 0.19 * w, cy, 0.14 * w * shrink, 0.22 * h * shrink)
        s[r | l] = -850.0
        truth["right_lung"][z] = r
        truth["left_lung"][z] = l
        if t > 0.6:  # trachea on the upper slices (z grows towards superior)
            s[ellipse(cx, cy - 0.12 * h, 8.0, 8.0)] = -1000.0
    if lesions:
        zc = nz / 2.0
        zz = (np.arange(nz)[:, None, None] + 0.5 - zc) * sz
        ggo = (((X - (cx - 0.19 * w)) / 18.0) ** 2 + ((Y - cy) / 14.0) ** 2)[None] + (zz / max(12.0, sz)) ** 2 <= 1.0
        cons = (((X - (cx + 0.19 * w)) / 12.0) ** 2 + ((Y - (cy + 0.05 * h)) / 12.0) ** 2)[None] + (zz / max(10.0, sz)) ** 2 <= 1.0
        ggo &= truth["right_lung"]
        cons &= truth["left_lung"]
        hu[ggo] = -500.0
        hu[cons] = 0.0
        truth["ggo"], truth["consolidation"] = ggo, cons
    hu += rng.normal(0.0, noise_hu, hu.shape).astype(np.float32)
    img = sitk.GetImageFromArray(np.clip(np.round(hu), -1024, 3071).astype(np.int16))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetOrigin((-cx, -cy, 0.0))
    return img, truth


def random_model(num_classes: int = 3, size: int = 512, pixel_spacing_mm: float = 0.7, spatial_conv: bool = True):
    """A randomly initialised full-size SSA-Net and a matching meta (timing only)."""
    import torch

    from ssanet.classes import default_class_names
    from ssanet.model import SSANet
    from ssanet.preprocess import LUNG_WINDOW_HU

    torch.manual_seed(0)
    net = SSANet(in_channels=2, num_classes=num_classes, spatial_conv=spatial_conv).eval()
    meta = {"class_names": default_class_names(num_classes),
            "preprocessing": {"size": size, "pixel_spacing_mm": pixel_spacing_mm, "fov_px": size,
                              "window_hu": list(LUNG_WINDOW_HU), "blank_outside_lung": True},
            "name": "random-init SSA-Net (timing only)", "sha256": None}
    return net, meta


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 / 1024.0 if sys.platform == "darwin" else r / 1024.0


def time_forward(device, size: int = 512, batch: int = 1, repeats: int = 3, cpu_bf16: bool = False) -> dict:
    """SSA-Net forward seconds with and without the spatial convolution (same weights elsewhere),
    in the precision the pipeline's Predictor uses on this device (``cpu_bf16`` as there)."""
    import contextlib

    import torch

    from ssanet.inference import inference_amp_dtype
    from ssanet.model import SSANet

    x = torch.randn(batch, 2, size, size, device=device)
    nets = {}
    for name, sc in (("with_spatial_conv", True), ("without_spatial_conv", False)):
        torch.manual_seed(0)
        nets[name] = SSANet(in_channels=2, num_classes=3, spatial_conv=sc).eval().to(device)
    if device.type == "cpu":  # as ssanet.inference.Predictor runs it
        x = x.contiguous(memory_format=torch.channels_last)
        nets = {k: v.to(memory_format=torch.channels_last) for k, v in nets.items()}
    times = {name: [] for name in nets}
    amp_dtype = inference_amp_dtype(device, cpu_bf16)
    cuda = device.type == "cuda"

    def once(net):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        net(x)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    amp = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    with torch.no_grad(), amp:
        for net in nets.values():  # warm-up: allocators, kernels
            once(net)
        # interleaved, median: on a shared machine load drifts between runs
        for _ in range(repeats):
            for name, net in nets.items():
                times[name].append(once(net))
    out = {name: {"seconds_per_batch": float(np.median(t)), "seconds_per_slice": float(np.median(t)) / batch}
           for name, t in times.items()}
    w, wo = out["with_spatial_conv"]["seconds_per_batch"], out["without_spatial_conv"]["seconds_per_batch"]
    # the spatial convolution's share of the forward time, (with - without) / with -- the figure
    # the README's measurements quote; the report prints the increase over "without" beside it
    out["spatial_conv_overhead_percent"] = 100.0 * (w - wo) / w if w > 0 else None
    out["batch"], out["size"], out["repeats"] = batch, size, repeats
    out["precision"] = str(amp_dtype or torch.float32).replace("torch.", "")
    return out


def run_bench(n_slices: int = 8, size: int = 512, checkpoint=None, lungs: str = "classical", lung_weights=None,
              device: str = "auto", batch_size: int | None = None, repeats: int = 3,
              flip_tta: bool | None = None, cpu_bf16: bool = True) -> dict:
    import torch

    from ssanet.inference import select_device

    from .io import read_ct, write_image
    from .pipeline import load_model, segment_image, write_outputs

    dev = select_device(device)
    px = 0.7 * 512 / size  # keep a chest-sized field of view at any matrix size
    img, _ = synthetic_chest_ct(n_slices, size, spacing=(px, px, 2.5))
    model = load_model(checkpoint) if checkpoint else random_model(size=size, pixel_spacing_mm=px)
    with tempfile.TemporaryDirectory(prefix="ssalesionseg-bench-") as d:
        src = Path(d) / "synthetic.nii.gz"
        write_image(img, src)
        del img
        t = time.perf_counter()
        ct, _ = read_ct(src)
        t_read = time.perf_counter() - t
        res = segment_image(ct, model=model, lungs=lungs, lung_weights=lung_weights, device=device,
                            batch_size=batch_size, source="synthetic", flip_tta=flip_tta,
                            cpu_bf16=cpu_bf16)
        t = time.perf_counter()
        write_outputs(res, ct, Path(d) / "out", "synthetic")
        t_write = time.perf_counter() - t
    tim = res.info["timings_s"]
    fwd = time_forward(dev, size=size, batch=1, repeats=repeats, cpu_bf16=cpu_bf16)
    return {
        "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(dev),
                    "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None},
        "ct": {"size": [size, size, n_slices], "spacing_mm": [px, px, 2.5]},
        "model": model[1].get("name"),
        "flip_tta": res.info["flip_tta"],
        "precision": res.info["precision"],
        "lung_method": res.info["lung_method"],
        "seconds": {"read": t_read, "lungs": tim["lungs"], "lesions": tim["lesions"], "stats": tim["stats"],
                    "write": t_write},
        "lesion_slices": res.info["lesion_slices"],
        "lesion_slices_per_s": res.info["lesion_slices_per_s"],
        "peak_rss_mb": peak_rss_mb(),
        "forward": fwd,
    }


def format_report(r: dict) -> str:
    s = r["seconds"]
    f = r["forward"]
    lines = [
        f"machine: {r['machine']['processor']} ({r['machine']['cpus']} CPUs) | {r['machine']['platform']} | "
        f"torch {r['machine']['torch']} "
        f"({r['machine']['torch_threads']} threads) | device {r['machine']['device']}"
        + (f" ({r['machine']['gpu']})" if r["machine"]["gpu"] else ""),
        f"CT: synthetic {r['ct']['size'][0]}x{r['ct']['size'][1]}x{r['ct']['size'][2]}; model: {r['model']}"
        f"{' (flip TTA)' if r.get('flip_tta') else ''}; {r.get('precision', 'float32')}; "
        f"lungs: {r['lung_method']}",
        "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()),
        f"lesion slices: {r['lesion_slices']} at {r['lesion_slices_per_s'] or 0:.2f} slices/s",
        f"peak RSS: {r['peak_rss_mb']:.0f} MB",
        f"SSA-Net forward ({f['size']}^2, batch {f['batch']}, {f.get('precision', 'float32')}): "
        f"{f['with_spatial_conv']['seconds_per_batch']:.3f} s with spatial conv, "
        f"{f['without_spatial_conv']['seconds_per_batch']:.3f} s without "
        f"(its share of the forward {f['spatial_conv_overhead_percent']:.1f} %, i.e. "
        f"+{100.0 * (f['with_spatial_conv']['seconds_per_batch'] / f['without_spatial_conv']['seconds_per_batch'] - 1):.1f} % "
        "over the network without it)",
    ]
    return "\n".join(lines)
