"""What an output folder holds for a case: the outputs' names, what the stats JSON records of
the run that wrote them (input, model, settings, each file's SHA-256), and the rules a rerun
follows — skip, refuse, or replace keeping the user's edits as ``.bak``. Used by ``segment``,
``stats``, ``demo`` and the Slicer batch script; no torch at import.
"""
from __future__ import annotations

import contextlib
import json
import ntpath
import os
from pathlib import Path

from .io import OPTIONAL_OUTPUT_SUFFIXES, OUTPUT_SUFFIXES

# what segment's stats JSON says of the run that made the labels, kept by ``stats`` (and Slicer's
# Recompute) when it replaces those figures with the corrected ones (info.labels_made_by)
MADE_BY = ("checkpoint", "device", "precision", "flip_tta", "min_lesion_mm2", "class_names", "lung_method",
           "lung_details")
# info.lung_method of figures recomputed from labels that hold their own lung segments
LUNGS_FROM_LABELS = "segmentation file"


def optional_outputs(save_probability: bool = False, labelmaps: bool = False) -> tuple:
    """The keys of :data:`~.io.OPTIONAL_OUTPUT_SUFFIXES` a run asks for."""
    return (("confidence",) if save_probability else ()) + (("lesion_labelmap", "lung_labelmap") if labelmaps else ())


def output_paths(out_dir, name: str, optional=()) -> dict:
    """{key: path} of the outputs of case ``name``: the four always written, plus ``optional``."""
    out_dir = Path(out_dir)
    suffixes = {**OUTPUT_SUFFIXES, **{k: OPTIONAL_OUTPUT_SUFFIXES[k] for k in optional}}
    return {k: out_dir / f"{name}{suf}" for k, suf in suffixes.items()}


def outputs_complete(out_dir, name: str, optional=()) -> bool:
    """Every output of ``name`` is there, including the ``optional`` ones this run asks for
    (a rerun with ``--labelmaps`` is not "done" by outputs written without them), and those
    are the ones its stats JSON lists (not a file of the user's that has the same name)."""
    paths = output_paths(out_dir, name, optional)
    recorded = RecordedRun(out_dir, name).names
    return (all(p.is_file() for p in paths.values())
            and all(paths[k].name in recorded for k in optional))


def recomputed_by_stats(out_dir, name: str) -> bool:
    """The stats JSON of ``name`` in ``out_dir`` was written by ``ssalesionseg stats`` (figures of
    corrected labels), not by ``segment``."""
    return bool(_recorded_info(out_dir, name).get("recomputed_by"))


class RecordedRun:
    """What the stats JSON of case ``name`` in ``out_dir`` records of the outputs written with
    it (read once): their file names and SHA-256s."""

    def __init__(self, out_dir, name: str):
        self.stats_json = output_paths(out_dir, name)["stats_json"]
        info = _recorded_info(out_dir, name)
        self.info = info   # the whole "info" of that stats JSON ({} when there is none)
        outputs, hashes = info.get("outputs"), info.get("outputs_sha256")
        # ntpath: the folder may have been written on Windows (backslashes) and read here
        self.outputs = outputs if isinstance(outputs, dict) else {}   # {key: path as written}
        self.names = {ntpath.basename(str(v)) for v in self.outputs.values()}
        self.hashes = hashes if isinstance(hashes, dict) else {}

    def changed(self, key: str, path: Path) -> bool:
        """``path`` (output ``key``) is not as ``segment`` wrote it: not listed, or another
        SHA-256 than recorded (for runs before the hashes were recorded: modified after the
        stats JSON)."""
        from ssanet.checkpoint import sha256_of

        if path.name not in self.names:
            return True
        if self.hashes.get(key):
            return sha256_of(path) != self.hashes[key]
        return self.stats_json.is_file() and path.stat().st_mtime > self.stats_json.stat().st_mtime + 2


def foreign_files(out_dir, name: str, optional=()) -> list:
    """Files in ``out_dir`` at the names the outputs of ``name`` would take that are not the
    engine's unchanged outputs (:meth:`RecordedRun.changed`): e.g. the user's own
    ``<name>_lungs.nii.gz``, or a ``.seg.nrrd`` corrected in place. Writing the case would
    replace them."""
    recorded = RecordedRun(out_dir, name)
    return [p for k, p in output_paths(out_dir, name, optional).items()
            if k not in ("stats_json", "stats_csv") and p.exists() and recorded.changed(k, p)]


def edited_outputs(out_dir, name: str, optional=()) -> list:
    """The files a run of ``name`` would replace that hold the user's work: the outputs not as
    ``segment`` wrote them (:func:`foreign_files`), and the stats JSON / CSV when ``stats``
    recomputed them from corrected labels."""
    files = foreign_files(out_dir, name, optional)
    if recomputed_by_stats(out_dir, name):
        files += [p for k, p in output_paths(out_dir, name).items() if k in ("stats_json", "stats_csv") and p.exists()]
    return files


@contextlib.contextmanager
def copies_kept(files):
    """``with copies_kept(files) as copies: <replace files>`` -- each file is first copied to
    ``<file>.bak`` (``.bak-2``, ... when taken), before ``--overwrite`` replaces it. If the
    block fails, a copy whose file is still there as it was (nothing replaced it) is removed,
    so that retries do not pile up copies; a copy of a file that is gone or changed stays.
    A ``.bak`` name is never read as a CT or an output."""
    import filecmp
    import shutil

    copies = []
    try:
        for f in map(Path, files):
            copy, n = f.with_name(f.name + ".bak"), 1
            while copy.exists():
                n += 1
                copy = f.with_name(f"{f.name}.bak-{n}")
            shutil.copy2(f, copy)
            copies.append(copy)
        yield copies
    except BaseException:
        for f, copy in zip(files, copies):
            if Path(f).is_file() and filecmp.cmp(f, copy, shallow=False):
                copy.unlink(missing_ok=True)
        raise


def _recorded_info(out_dir, name: str) -> dict:
    """The ``info`` the existing stats JSON of ``name`` in ``out_dir`` records ({} if none)."""
    try:
        info = json.loads(output_paths(out_dir, name)["stats_json"].read_text()).get("info") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return info if isinstance(info, dict) else {}


def outputs_from_other_input(out_dir, name: str, input_path) -> str | None:
    """The input that the existing outputs ``name`` in ``out_dir`` were made from, when that
    is provably another file or folder than ``input_path`` (their stats JSON records it and
    it still exists); else None (the same input, or nothing to tell)."""
    recorded = _recorded_info(out_dir, name).get("source")
    if not recorded:
        return None
    try:
        return None if os.path.samefile(recorded, input_path) else str(recorded)
    except OSError:   # moved, renamed or relative to another folder: cannot tell
        return None


def _input_files(path) -> list:
    """The files an input consists of: the file itself, or a folder's DICOM files (hidden files,
    an output folder's results and other files in it are not the CT)."""
    from .io import is_dicom_file

    p = Path(path)
    if not p.is_dir():
        return [p]
    found = []
    for d, dirs, files in os.walk(p):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        found += [Path(d, f) for f in sorted(files) if is_dicom_file(Path(d, f))]
    return found


def input_stamp(path, sha256: bool = True) -> dict:
    """What the input ``path`` was when a run read it: its files' number, total size and latest
    modification time, and (``sha256``) a SHA-256 of their names and contents -- recorded in the
    stats JSON as ``info.input_stamp``, so that a rerun can tell a CT replaced at the same path."""
    import hashlib

    p = Path(path)
    files = _input_files(p)
    st = [f.stat() for f in files]
    stamp = {"files": len(files), "bytes": sum(s.st_size for s in st),
             "mtime_ns": max((s.st_mtime_ns for s in st), default=0)}
    if sha256:
        h = hashlib.sha256()
        for f in files:
            h.update(os.fsencode(f.relative_to(p) if p.is_dir() else f.name) + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        stamp["sha256"] = h.hexdigest()
    return stamp


def input_changed_since(out_dir, name: str, input_path) -> str | None:
    """How the input of the existing outputs ``name`` in ``out_dir`` changed since they were made
    from it ("2 files, 5.1 MB, modified 2026-12-06 07:10 then; 3 files, 6.0 MB, modified ...
    now"), when their stats JSON records the same input with another content (a scan
    re-exported or replaced at the same path); else None. Size and time are compared first; the
    contents are hashed only when those differ (a copy with new times is the same input)."""
    import datetime

    info = _recorded_info(out_dir, name)
    before = info.get("input_stamp")
    if not isinstance(before, dict) or not info.get("source") or not _same_path(info["source"], input_path):
        return None
    try:
        now = input_stamp(input_path, sha256=False)
        if all(before.get(k) == now[k] for k in now):
            return None
        if before.get("sha256") and input_stamp(input_path)["sha256"] == before["sha256"]:
            return None
    except OSError:   # unreadable now: reading it fails as the case, with the reason
        return None

    def say(st):
        when = datetime.datetime.fromtimestamp((st.get("mtime_ns") or 0) / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        return f"{st.get('files')} file{'s' if st.get('files') != 1 else ''}, {(st.get('bytes') or 0) / 1e6:.1f} MB, " \
               f"modified {when}"
    return f"{say(before)} then; {say(now)} now"


def checkpoint_sha256(checkpoint=None) -> str | None:
    """SHA-256 of the model file ``checkpoint`` resolves to (the documented order), or None."""
    from ssanet.checkpoint import resolve_checkpoint, sha256_of
    path, _ = resolve_checkpoint(checkpoint)
    return sha256_of(path) if Path(path).is_file() else None


def outputs_from_other_model(out_dir, name: str, sha256: str | None) -> str | None:
    """The model the existing outputs ``name`` were made with, when their stats JSON records
    another model file than the one with ``sha256``; else None."""
    recorded = _recorded_info(out_dir, name).get("checkpoint")
    recorded = recorded if isinstance(recorded, dict) else {}
    if not sha256 or not recorded.get("sha256") or recorded["sha256"] == sha256:
        return None
    return f"{recorded.get('name') or 'a model'} (SHA-256 {recorded['sha256'][:12]}…)"


def outputs_with_other_settings(out_dir, name: str, *, flip_tta=None, min_lesion_mm2=None, cpu_bf16: bool = True,
                                lungs: str = "auto", lung_mask=None) -> str | None:
    """What the existing outputs ``name`` were made with that differs from the settings a run
    asks for ("flip TTA: off -> on; ..."), or None. Only settings the run names count
    (None / "auto" mean the model's or the engine's default, which the same model and
    engine repeat); bfloat16 asked for but float32 recorded is no difference (a CPU without
    native bf16 runs float32)."""
    info = _recorded_info(out_dir, name)
    if not info:
        return None
    differ = []

    def say(what, before, now):
        differ.append(f"{what}: {before} -> {now}")

    on_off = {True: "on", False: "off"}
    if flip_tta is not None and info.get("flip_tta") in on_off and info["flip_tta"] != flip_tta:
        say("flip TTA", on_off[info["flip_tta"]], on_off[flip_tta])
    recorded_min = info.get("min_lesion_mm2")
    if min_lesion_mm2 is not None and isinstance(recorded_min, (int, float)) and recorded_min != min_lesion_mm2:
        say("--min-lesion-mm2", f"{recorded_min:g}", f"{min_lesion_mm2:g}")
    if not cpu_bf16 and info.get("precision") == "bfloat16":
        say("precision", "bfloat16", "float32 (--no-bf16)")
    method = info.get("lung_method")
    if lung_mask is not None:
        given = ((info.get("lung_details") or {}) if isinstance(info.get("lung_details"), dict) else {}).get("file")
        if method != "file":
            say("lungs", method, f"--lung-mask {lung_mask}")
        elif given and not _same_path(given, lung_mask):
            say("--lung-mask", given, lung_mask)
    elif lungs != "auto" and method and method != lungs:
        say("lungs", method, lungs)
    return "; ".join(differ) or None


def _same_path(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
