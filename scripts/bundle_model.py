"""Bundle a trained checkpoint as the default model (half-precision storage + registry entry).

    python scripts/bundle_model.py runs/default256/best.safetensors [--name NAME] [--test-json EVAL.json] [--flip-tta]
    python scripts/bundle_model.py runs/x/best.safetensors --out runs/x/candidate.safetensors [--flip-tta]
    python scripts/bundle_model.py runs/ens/ensemble.safetensors --storage int8 ...   # an ensemble (ssalesionseg ensemble)

Writes SSALesionSeg/Resources/Models/<name>.safetensors and records its SHA-256 in
models.json (verified by ssanet.checkpoint at every load). With --out it writes the same
file there instead and leaves the bundle and models.json alone (a candidate,
to be validated exactly as it would be shipped). The model card beside it is
written by hand from the run's config and the evaluation JSON.
"""
import argparse
import json
from pathlib import Path

from ssanet import checkpoint as ckpt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--name", default="ssanet_ggo_consolidation_v6")
    p.add_argument("--test-json", help="evaluate JSON of this checkpoint on the test split, stored in the header")
    p.add_argument("--flip-tta", action="store_true",
                   help="record that inference averages with the mirrored prediction (meta['inference'])")
    p.add_argument("--out", help="write the file here and leave the bundled model and models.json alone")
    p.add_argument("--storage", default="float16", choices=["float16", "int8"],
                   help="float16 (default), or int8 kernels with per-channel scales: half the size, "
                        "for an ensemble of two networks within the 64 MB a bundled file may take")
    a = p.parse_args(argv)
    model, meta = ckpt.load_checkpoint(a.checkpoint)
    for k in ("path", "name", "sha256", "format", "model", "storage_dtype", "ensemble"):
        meta.pop(k, None)
    meta["source_checkpoint_sha256"] = ckpt.sha256_of(a.checkpoint)
    meta["inference"] = {"flip_tta": bool(a.flip_tta)}
    if a.test_json:
        meta["test_metrics"] = json.loads(Path(a.test_json).read_text())["classes"]
    if a.out:
        digest = ckpt.save_checkpoint(a.out, model, meta, storage=a.storage)
        print(f"{a.out} ({Path(a.out).stat().st_size / 1e6:.1f} MB) sha256 {digest}")
        return
    out = ckpt.MODELS_DIR / f"{a.name}.safetensors"
    digest = ckpt.save_checkpoint(out, model, meta, storage=a.storage)
    registry = {"models": [{"name": a.name, "file": out.name, "sha256": digest, "default": True,
                            "classes": meta["class_names"], "card": "MODEL_CARD.md"}]}
    ckpt.REGISTRY.write_text(json.dumps(registry, indent=1) + "\n")
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB) sha256 {digest}")


if __name__ == "__main__":
    main()
