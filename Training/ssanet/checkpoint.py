"""Checkpoints: one safetensors file with the weights and a JSON header; never executes code.

The JSON (safetensors ``__metadata__["ssanet"]``) carries the architecture config, class
names, preprocessing parameters, training-data description and validation metrics, so
a checkpoint is self-describing for training, evaluation, the CLI and Slicer.

Default-model resolution (first hit wins): explicit path -> env ``SSALESIONSEG_MODEL`` ->
user cache (``$SSALESIONSEG_CACHE`` or ``~/.cache/ssalesionseg/models/default.safetensors``)
-> the bundled model listed in ``SSALesionSeg/Resources/Models/models.json``.

What a load verifies (:func:`load_checkpoint`, and so segmenting, evaluating, averaging,
ensembles, members, ``--init`` and resuming from ``last``/``raw.safetensors``; the trainer's
``train_state.pt`` is a torch file of tensors, not a checkpoint):

* the content digest: :func:`save_checkpoint` records ``content_sha256`` in the header, a
  SHA-256 over the header (every other field) and every tensor's name, dtype, shape and bytes
  (:func:`content_sha256`). A file whose header or weights were changed afterwards is refused.
  Files written before the digest existed (e.g. the bundled v6) carry none and load without
  this check; :func:`describe` (``ssalesionseg info --checkpoint``) says which a file is.
* the registry: a file bearing the file name of a model in ``models.json`` must have the
  SHA-256 recorded there, wherever it is loaded from (the bundle picked by default, or a path
  given with ``--checkpoint`` or ``SSALESIONSEG_MODEL``; the user cache's
  ``default.safetensors`` bears no registered name, so there the content digest is the check).
  A model written before content digests has its header's SHA-256 recorded too
  (``header_sha256``): a file with that header under any name must have the model's SHA-256,
  so a renamed copy whose weights were changed is refused.

The digest catches changed, truncated-and-patched or hand-edited files; it is not a signature
(whoever rewrites a file on purpose can write a new digest too).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .classes import default_class_names  # noqa: F401  (ckpt.default_class_names for train / semisup)
from .model import SSANet, SSANetConfig, SSANetEnsemble

FORMAT = "ssanet-checkpoint/1"
STORAGE_DTYPES = ("float32", "float16", "int8")
INT8_SCALE = ".int8_scale"   # suffix of the per-output-channel scale of an int8 weight
MODELS_DIR = Path(__file__).resolve().parents[2] / "SSALesionSeg" / "Resources" / "Models"
REGISTRY = MODELS_DIR / "models.json"
CONTENT_DIGEST = "content_sha256"   # the header field holding content_sha256(header, tensors)
_DIGEST_DOMAIN = b"ssanet-content-sha256/1\n"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, tampered with or does not fit the network."""


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _feed(h, data) -> None:
    """One length-prefixed field of the canonical encoding (so no two encodings collide)."""
    data = memoryview(data).cast("B")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def content_sha256(header: dict, state: dict) -> str:
    """SHA-256 of a checkpoint's content: its header and its tensors as stored.

    Canonical encoding: the header as JSON with sorted keys and no whitespace, without the
    ``content_sha256`` field itself; then, in sorted name order, each tensor's name, dtype and
    shape (as JSON) and its raw little-endian bytes — every field length-prefixed. ``state``
    holds the stored tensors (float16 / int8 as written, not the float32 they load as).
    """
    h = hashlib.sha256(_DIGEST_DOMAIN)
    rest = {k: v for k, v in header.items() if k != CONTENT_DIGEST}
    _feed(h, json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        _feed(h, json.dumps([name, str(t.dtype).split(".")[-1], list(t.shape)],
                            separators=(",", ":")).encode())
        _feed(h, t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _check_content(path, header: dict, state: dict) -> bool | None:
    """Verify the recorded content digest: True when it matches, None when the file carries
    none (written before content digests); a mismatch is a CheckpointError."""
    recorded = header.get(CONTENT_DIGEST)
    if recorded is None:
        return None
    actual = content_sha256(header, state)
    if not isinstance(recorded, str) or recorded.lower() != actual:
        shown = f"{recorded[:12]}…" if isinstance(recorded, str) else repr(recorded)
        raise CheckpointError(
            f"{path}: content digest mismatch — the file was changed after it was written (its "
            f"header or its weights differ from what was saved: recorded {CONTENT_DIGEST} "
            f"{shown}, content now {actual[:12]}…), so it could give changed or swapped results. "
            "Restore the original file, or re-export it with the command that made it "
            "(`ssalesionseg train`, `ensemble`, `average`, `member`, scripts/bundle_model.py).")
    return True


def save_checkpoint(path, model: SSANet | SSANetEnsemble, meta: dict | None = None,
                    half: bool = False, storage: str | None = None) -> str:
    """Write ``model`` + ``meta`` atomically; returns the file's SHA-256.

    The header records ``content_sha256`` (:func:`content_sha256` of the header and the
    tensors exactly as stored), which every load verifies; a ``content_sha256`` in ``meta``
    (e.g. from a loaded checkpoint's meta) is replaced.

    ``storage`` (``half=True`` is ``"float16"``): ``"float16"`` stores floating-point
    weights as float16, ``"int8"`` stores every kernel (convolution, transposed convolution;
    the tensors of two or more dimensions) as int8 with one float32 scale per output channel
    (symmetric, ``w ≈ q * scale``) and the rest as float16 — half the size again, for
    ensembles. Everything is cast back to float32 at load time. BatchNorm running statistics
    stay float32: they are tiny, and after the spatial convolution they can exceed float16's
    range. An :class:`SSANetEnsemble` is recorded as ``meta["ensemble"]``.
    """
    storage = storage or ("float16" if half else "float32")
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage must be one of {STORAGE_DTYPES}, got {storage!r}")
    path = Path(path)
    meta = dict(meta or {})
    meta.pop(CONTENT_DIGEST, None)
    meta["format"] = FORMAT
    meta["model"] = model.config.to_dict()
    meta.setdefault("class_names", default_class_names(model.config.num_classes))
    if isinstance(model, SSANetEnsemble):
        meta["ensemble"] = {"members": len(model.members)}
    else:
        meta.pop("ensemble", None)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if storage != "float32" and v.is_floating_point() and not k.endswith(("running_mean", "running_var")):
            if storage == "int8" and v.dim() >= 2:
                v, state[k + INT8_SCALE] = _quantize_int8(v)
            else:
                v = v.half()
        state[k] = v
    meta["storage_dtype"] = storage
    header = json.loads(json.dumps(meta))   # the header as a load will decode it
    header[CONTENT_DIGEST] = content_sha256(header, state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file(state, str(tmp), metadata={"ssanet": json.dumps(header)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # safetensors creates 0600; a model is shared like any output
    os.replace(tmp, path)
    return sha256_of(path)


def _quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel (dim 0) int8: returns (q, scale) with w ≈ q * scale."""
    w = w.float()
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale.view(-1, *([1] * (w.dim() - 1)))).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _dequantize(state: dict) -> dict:
    """float32 tensors from a stored state: int8 kernels times their scales, the rest cast."""
    out = {}
    for k, v in state.items():
        if k.endswith(INT8_SCALE):
            continue
        scale = state.get(k + INT8_SCALE)
        if scale is not None:
            v = v.float() * scale.float().view(-1, *([1] * (v.dim() - 1)))
        out[k] = v.float() if v.is_floating_point() else v
    return out


def network_count(meta: dict) -> int:
    """How many networks a checkpoint header describes (1 unless it is an ensemble)."""
    return int((meta.get("ensemble") or {}).get("members", 1))


def build_network(meta: dict) -> SSANet | SSANetEnsemble:
    """The (untrained) network a checkpoint header describes: one SSA-Net or an ensemble."""
    members = network_count(meta)
    if members > 1:
        return SSANetEnsemble(SSANet.from_config(meta["model"]) for _ in range(members))
    return SSANet.from_config(meta["model"])


def is_ensemble(meta: dict) -> bool:
    return network_count(meta) > 1


def require_single_network(meta: dict, what: str, member: int | None = None) -> None:
    """Training starts from one network. An ensemble checkpoint is accepted only with a valid
    ``member`` index (which of its networks to start from); otherwise refused with the reason."""
    n = network_count(meta)
    has_member = member is not None and member >= 0
    if n == 1:
        if has_member:
            raise CheckpointError(f"--init-member {member}: {what} {meta.get('path', '')} is a single "
                                  "network, not an ensemble; drop --init-member")
        return
    names = ", ".join(m.get("name", "?") for m in (meta.get("training") or {}).get("ensemble_of", []))
    if not has_member:
        raise CheckpointError(
            f"{what} {meta.get('path', '')} is an ensemble of {n} networks "
            f"({names or 'members unnamed'}); training starts from one network: choose it with "
            f"--init-member K (0 to {n - 1}), e.g. fine-tune each member and combine the results "
            "again with `ssalesionseg ensemble`")
    if member >= n:
        raise CheckpointError(f"--init-member {member}: {what} {meta.get('path', '')} has members 0 to {n - 1}")


def read_meta(path) -> dict:
    """The JSON header only (cheap): raises CheckpointError for anything that is not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not an SSA-Net checkpoint (not a readable safetensors file: {e}). "
            "Give a .safetensors file written by `ssalesionseg train` (or the bundled model)."
        ) from None
    if "ssanet" not in header:
        raise CheckpointError(f"{path} is a safetensors file but has no SSA-Net header; "
                              "it was not written by ssanet.save_checkpoint")
    try:
        meta = json.loads(header["ssanet"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt SSA-Net header ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}, "
                              f"expected {FORMAT!r}")
    return meta


def _registry_entries() -> list[dict]:
    """The models ``models.json`` lists; none when it is missing or unreadable (a user's own
    checkpoint must still load then; the bundled default is then not found, said there)."""
    try:
        entries = json.loads(REGISTRY.read_text()).get("models", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _registry_entry() -> dict | None:
    return next((e for e in _registry_entries() if e.get("default")), None)


def registered_entry(path) -> dict | None:
    """The ``models.json`` entry whose file name is ``path``'s (a copy of a registered model,
    wherever it lies), or None. Such a file must have that entry's SHA-256."""
    name = Path(path).name
    return next((e for e in _registry_entries() if e.get("file") == name and e.get("sha256")), None)


def header_sha256(meta: dict) -> str:
    """SHA-256 of a checkpoint's header as read (:func:`read_meta`), keys sorted: what
    ``models.json`` records as ``header_sha256`` for a model written before content digests."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def header_twin_entry(meta: dict) -> dict | None:
    """The ``models.json`` entry recording ``meta``'s header (``header_sha256``): the file is that
    model or a changed copy of it, whatever its name. Only for headers without a content digest
    (a file with one is checked by it)."""
    if CONTENT_DIGEST in meta:
        return None
    h = header_sha256(meta)
    return next((e for e in _registry_entries() if e.get("header_sha256") == h and e.get("sha256")), None)


def _sha_mismatch(path, digest: str, expected: str, why: str = "") -> CheckpointError:
    return CheckpointError(
        f"{path}: SHA-256 mismatch (file {digest[:12]}…, expected {expected[:12]}…{why}). The file "
        "is corrupt or was replaced; restore it or pass the intended file with --checkpoint.")


def resolve_checkpoint(path=None) -> tuple[Path, str | None]:
    """(path, expected SHA-256 or None) following the documented resolution order."""
    if path:
        return Path(path), None
    env = os.environ.get("SSALESIONSEG_MODEL")
    if env:
        return Path(env), None
    cache = Path(os.environ.get("SSALESIONSEG_CACHE", Path.home() / ".cache" / "ssalesionseg"))
    cached = cache / "models" / "default.safetensors"
    if cached.is_file():
        return cached, None
    entry = _registry_entry()
    if entry is None:
        raise CheckpointError(
            "no model given and no default model is available: pass --checkpoint PATH, set "
            "SSALESIONSEG_MODEL, or place a model at " + str(cached))
    return MODELS_DIR / entry["file"], entry["sha256"]


def load_checkpoint(path=None, expected_sha256: str | None = None,
                    map_location="cpu") -> tuple[SSANet, dict]:
    """Build the network from the header and load the weights (strictly). Returns (model, meta).

    The model is returned in eval mode on ``map_location``. ``meta`` gains ``path``,
    ``name`` and ``sha256``. Refused (CheckpointError): a file whose SHA-256 is not
    ``expected_sha256`` (or the registered one, for the bundled model picked by default or
    any file bearing a registered model's file name), and one whose recorded content digest
    does not match its header and weights (see the module docstring).
    """
    path, registered = resolve_checkpoint(path)
    meta = read_meta(path)
    digest = sha256_of(path)
    expected = expected_sha256 or registered
    if expected and digest.lower() != expected.lower():
        raise _sha_mismatch(path, digest, expected)
    entry = registered_entry(path)
    if entry and digest.lower() != entry["sha256"].lower():
        raise _sha_mismatch(path, digest, entry["sha256"],
                            f" — the SHA-256 that models.json records for {entry['file']}, the "
                            "registered model whose file name this file bears; another model needs "
                            "another file name")
    twin = None if entry else header_twin_entry(meta)
    if twin and digest.lower() != twin["sha256"].lower():   # a renamed copy of a digest-less model, changed
        raise _sha_mismatch(path, digest, twin["sha256"],
                            f" — the SHA-256 that models.json records for {twin['file']}, whose header "
                            "this file has, so its weights were changed after it was written")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt weights ({e})") from None
    _check_content(path, meta, state)   # before the header is trusted to build the network
    try:
        model = build_network(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid architecture config in header ({e})") from None
    state = _dequantize(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise CheckpointError(f"{path}: weights do not match the architecture in its header: "
                              + " ".join(first)) from None
    model.eval().to(map_location)
    meta.update(path=str(path), name=path.name, sha256=digest)
    return model, meta


def average_checkpoints(paths) -> tuple[SSANet, dict]:
    """Uniform average of the weights of checkpoints fine-tuned from one starting point
    (a "model soup"): one network, so inference costs what a single model costs.

    All files must share architecture, classes and preprocessing. BatchNorm running
    statistics are averaged like the weights; integer buffers are taken from the first.
    Returns (model in eval mode, meta of the first with ``training.averaged_from``).
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise CheckpointError("averaging needs at least two checkpoints")
    models, metas = _load_compatible(paths, "averaged")
    states = [m.state_dict() for m in models]
    avg = {}
    for k, v in states[0].items():
        avg[k] = (torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v.clone())
    model = SSANet.from_config(metas[0]["model"])
    model.load_state_dict(avg, strict=True)
    model.eval()
    meta = {k: v for k, v in metas[0].items() if k not in ("path", "name", "sha256", "val_metrics")}
    training = dict(meta.get("training") or {})
    training["averaged_from"] = [
        {"name": m["name"], "sha256": m["sha256"], "epoch": (m.get("training") or {}).get("epoch"),
         "init_sha256": (m.get("training") or {}).get("init_sha256")} for m in metas]
    meta["training"] = training
    return model, meta


def _load_compatible(paths, verb: str):
    """Load single-network checkpoints that share architecture, classes and preprocessing."""
    models, metas = zip(*(load_checkpoint(p) for p in paths))
    for p, m in zip(paths, metas):
        if is_ensemble(m):
            raise CheckpointError(f"{p} is already an ensemble of {network_count(m)} networks; "
                                  f"only single networks can be {verb}")
    for key in ("model", "class_names", "preprocessing"):
        for p, m in zip(paths[1:], metas[1:]):
            if m.get(key) != metas[0].get(key):
                raise CheckpointError(f"{p}: its {key} differs from {paths[0]}'s; only checkpoints "
                                      f"of the same network, classes and input can be {verb}")
    return models, metas


def ensemble_checkpoints(paths) -> tuple[SSANetEnsemble, dict]:
    """An ensemble of independently trained checkpoints: their class probabilities are
    averaged at inference (each member costs one forward pass). All must share architecture,
    classes and preprocessing. Returns (ensemble in eval mode, meta of the first with
    ``training.ensemble_of`` naming the members; their metrics are dropped)."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise CheckpointError("an ensemble needs at least two checkpoints")
    models, metas = _load_compatible(paths, "combined into an ensemble")
    model = SSANetEnsemble(models).eval()
    meta = {k: v for k, v in metas[0].items()
            if k not in ("path", "name", "sha256", "val_metrics", "test_metrics", "training")}
    meta["training"] = {"ensemble_of": [
        {"name": _member_name(p, m), "sha256": m["sha256"], "training": m.get("training")}
        for p, m in zip(paths, metas)]}
    return model, meta


def _member_name(path: Path, meta: dict) -> str:
    """A member's name in an ensemble's header: its file name, with the run folder when the
    file is a run's generic best/last checkpoint ("ft0/best.safetensors")."""
    if path.name in ("best.safetensors", "last.safetensors") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return meta["name"]


def ensemble_member(path, member: int) -> tuple[SSANet, dict]:
    """Network ``member`` of an ensemble checkpoint as a single network (to fine-tune or
    ship alone, or to recombine with ``ensemble_checkpoints``); its meta is the ensemble's
    (classes, preprocessing, inference) with the member's own training record and
    ``training.member_of`` naming the file it came from."""
    model, meta = load_checkpoint(path)
    n = network_count(meta)
    if n == 1:
        raise CheckpointError(f"{path} is a single network, not an ensemble: use it as it is")
    if not 0 <= member < n:
        raise CheckpointError(f"{path} has networks 0 to {n - 1}, not {member}")
    record = ((meta.get("training") or {}).get("ensemble_of") or [{}] * n)[member]
    out = {k: v for k, v in meta.items()
           if k not in ("path", "name", "sha256", "val_metrics", "test_metrics", "training", "ensemble",
                        "storage_dtype", "source_checkpoint_sha256")}
    out["training"] = {**(record.get("training") or {}),
                       "member_of": {"name": meta["name"], "sha256": meta["sha256"], "member": member,
                                     "member_name": record.get("name"), "member_sha256": record.get("sha256")}}
    return model.members[member], out


def _verification(path: Path, meta: dict, digest: str) -> dict:
    """What a load of ``path`` verifies, and whether it passes (for :func:`describe`)."""
    recorded = meta.get(CONTENT_DIGEST)
    if recorded is None:
        content = {"recorded": False, "verified": None,
                   "note": "no content digest recorded (written before content digests): it loads "
                           "without this check"}
    else:
        try:
            _check_content(path, meta, load_file(str(path), device="cpu"))
            content = {"recorded": True, "verified": True,
                       "note": "header and weights are as written; verified at every load"}
        except (SafetensorError, OSError) as e:   # described, not refused: a load says the same
            content = {"recorded": True, "verified": False, "note": f"refused at load: corrupt weights ({e})"}
        except CheckpointError as e:
            content = {"recorded": True, "verified": False, "note": f"refused at load: {e}"}
    out = {CONTENT_DIGEST: recorded, "content_digest": content, "registry": None}
    entry = registered_entry(path)
    if entry:
        ok = digest.lower() == entry["sha256"].lower()
        out["registry"] = {
            "model": entry.get("name"), "sha256": entry["sha256"], "verified": ok,
            "note": ("the SHA-256 models.json records for this file name; verified at every load" if ok
                     else "this file bears a registered model's file name but not its SHA-256: "
                          "refused at load")}
    elif header_twin_entry(meta):
        twin = header_twin_entry(meta)
        ok = digest.lower() == twin["sha256"].lower()
        out["registry"] = {
            "model": twin.get("name"), "sha256": twin["sha256"], "verified": ok,
            "note": ("a copy of this registered model under another name (its header and SHA-256); verified at "
                     "every load" if ok else "this file has a registered model's header but not its SHA-256 "
                     "(weights changed): refused at load")}
    return out


def describe(path) -> dict:
    """What a checkpoint is, from its header and size (nothing is run), and what a load of
    it verifies: ``content_digest`` (recorded? verified?) and ``registry`` (for a file bearing
    a registered model's file name). A file that would be refused is described, not refused."""
    path = Path(path)
    meta = read_meta(path)
    digest = sha256_of(path)
    training = meta.get("training") or {}
    members = training.get("ensemble_of") or []
    pre = meta.get("preprocessing") or {}
    return {
        "file": str(path), "size_mb": round(path.stat().st_size / 1e6, 1), "sha256": digest,
        "networks": network_count(meta), "storage": meta.get("storage_dtype", "float32"),
        "classes": meta.get("class_names"), "input_size": pre.get("size"),
        "pixel_spacing_mm": pre.get("pixel_spacing_mm"), "blank_outside_lung": pre.get("blank_outside_lung"),
        "flip_tta": bool((meta.get("inference") or {}).get("flip_tta", False)),
        "members": [{"index": i, "name": m.get("name"), "sha256": m.get("sha256"),
                     "epoch": (m.get("training") or {}).get("epoch")} for i, m in enumerate(members)],
        "epoch": training.get("epoch"), "init_sha256": training.get("init_sha256"),
        "member_of": training.get("member_of"),
        "val_metrics": meta.get("val_metrics"), "test_metrics": meta.get("test_metrics"),
        **_verification(path, meta, digest),
    }


def load_state_for_resume(path) -> dict:
    """A training-state file (optimizer, epoch) written by the trainer: tensors only."""
    return torch.load(path, map_location="cpu", weights_only=True)
