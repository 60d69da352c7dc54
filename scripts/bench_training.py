"""Measure SSA-Net training and inference throughput on this machine (GPU or CPU).

    python scripts/bench_training.py [--device auto] [--size 512] [--batch-sizes 4 8] [--steps 20] [--json OUT]

Training: `ssanet.train.train_step`, the step `ssalesionseg train` runs (same mixed
precision, SAD loss on, AdamW, GradScaler), on random inputs, after warm-up steps;
images per second. Inference: `ssanet.inference.Predictor` (the code `evaluate`, `segment`
and the Slicer module use) with and without flip TTA; slices per second. Prints one JSON
object (also written to --json). The numbers are the model's alone: data loading and
augmentation are not included (measure those with the training log's seconds per epoch).
"""
import argparse
import json
import platform
import time

import numpy as np
import torch

from ssanet.inference import Predictor, select_device
from ssanet.losses import SSANetLoss
from ssanet.model import SSANet
from ssanet.train import autocast_dtype, train_step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_images_per_s(device, size, batch, steps, warmup=3):
    model = SSANet(2, 3).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = autocast_dtype(device, True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    loss_fn = SSANetLoss(sad_start_epoch=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 2, size, size, generator=g).mul(255).to(device)
    y = torch.randint(0, 3, (batch, size, size), generator=g).to(device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        train_step(model, x, y, loss_fn, opt, scaler, 1, amp)
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def infer_slices_per_s(device, size, batch, n, flip):
    pred = Predictor(SSANet(2, 3), device, batch_size=batch, flip_tta=flip)
    x = np.random.default_rng(0).uniform(0, 255, (n, 2, size, size)).astype(np.float32)
    pred.predict(x[:batch])                     # warm-up
    _sync(device)
    t0 = time.perf_counter()
    pred.predict(x)
    _sync(device)
    return n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8])
    p.add_argument("--steps", type=int, default=20, help="timed training steps per batch size")
    p.add_argument("--infer-slices", type=int, default=64)
    p.add_argument("--json")
    a = p.parse_args(argv)
    device = select_device(a.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    res = {"device": name, "torch": torch.__version__, "size": a.size,
           "amp": str(autocast_dtype(device, True)).replace("torch.", ""),
           "train_images_per_s": {}, "infer_slices_per_s": {}}
    for b in a.batch_sizes:
        res["train_images_per_s"][f"batch{b}"] = round(train_images_per_s(device, a.size, b, a.steps), 2)
        print(f"train batch {b}: {res['train_images_per_s'][f'batch{b}']} images/s", flush=True)
    for flip in (False, True):
        key = "flip_tta" if flip else "plain"
        res["infer_slices_per_s"][key] = round(
            infer_slices_per_s(device, a.size, max(a.batch_sizes), a.infer_slices, flip), 2)
        print(f"inference {key}: {res['infer_slices_per_s'][key]} slices/s", flush=True)
    if device.type == "cuda":
        res["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
