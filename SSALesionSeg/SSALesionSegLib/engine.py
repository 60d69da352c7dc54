"""Finds the segmentation engine (`ssalesionseg`) and gives it one small interface.

The engine is pip-installable, but an extension build ships the same code as the
module's ``Logic/`` folder; desktop Slicer must be able to use either.
"""

import importlib
import importlib.util
import os
import sys
import types

ENGINE_PACKAGE = "ssalesionseg"

LUNG_METHODS = {
    "auto": "Automatic (lungmask R231, else classical)",
    "lungmask": "lungmask R231 (right/left lung)",
    "lobes": "lungmask R231 + LTRCLobes (severity per lobe)",
    "classical": "Classical threshold fallback",
    "existing": "Existing segmentation",
}
DEVICES = {"auto": "Automatic", "cpu": "CPU", "cuda": "GPU (CUDA)"}
# Mirrored pass (flip test-time augmentation): the model's recorded setting, or forced on/off.
FLIP_TTA = {"model": "As the model records", "on": "On (two passes per slice)",
            "off": "Off (one pass per slice, half the lesion time)"}
_FLIP_TTA_OVERRIDE = {"model": None, "on": True, "off": False}


class EngineNotFoundError(ImportError):
    pass


def module_dir():
    """The Slicer module folder (the one holding ``SSALesionSeg.py`` and ``Logic/``)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_ssanet_importable(moduleDir=None):
    """Make the network package ``ssanet`` importable: installed, shipped next to the module
    (extension build copies ``Training/ssanet`` there), or the repository's ``Training/``
    (module used from a source checkout through "Additional module paths")."""
    if importlib.util.find_spec("ssanet") is not None:
        return
    base = moduleDir or module_dir()
    for candidate in (base, os.path.join(os.path.dirname(base), "Training")):
        if os.path.isfile(os.path.join(candidate, "ssanet", "__init__.py")):
            sys.path.insert(0, candidate)
            return
    # not found: the engine's own `import ssanet` then fails with the standard message


def import_engine_package(moduleDir=None):
    """Import ``ssalesionseg``: the installed package if any, else ``<moduleDir>/Logic``."""
    if sys.modules.get(ENGINE_PACKAGE) is not None:
        return sys.modules[ENGINE_PACKAGE]
    ensure_ssanet_importable(moduleDir)
    try:
        return importlib.import_module(ENGINE_PACKAGE)
    except ModuleNotFoundError as e:
        # A missing dependency *inside* an installed engine must surface as is.
        if e.name != ENGINE_PACKAGE:
            raise
    logicDir = os.path.join(moduleDir or module_dir(), "Logic")
    initFile = os.path.join(logicDir, "__init__.py")
    if not os.path.isfile(initFile):
        raise EngineNotFoundError(
            f"The '{ENGINE_PACKAGE}' engine is neither installed nor bundled in {logicDir}")
    spec = importlib.util.spec_from_file_location(
        ENGINE_PACKAGE, initFile, submodule_search_locations=[logicDir])
    package = importlib.util.module_from_spec(spec)
    # Registered before executing so that the package's own relative and absolute
    # imports of its submodules resolve to this folder.
    sys.modules[ENGINE_PACKAGE] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules[ENGINE_PACKAGE]
        raise
    return package


def load_engine(moduleDir=None):
    """Return the engine functions this module uses, as one namespace.

    Raises EngineNotFoundError (an ImportError) when the engine, or the part of it
    that is needed, cannot be imported.
    """
    import_engine_package(moduleDir)
    try:
        pipeline = importlib.import_module(ENGINE_PACKAGE + ".pipeline")
        stats = importlib.import_module(ENGINE_PACKAGE + ".stats")
        lungstep = importlib.import_module(ENGINE_PACKAGE + ".lungstep")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(ENGINE_PACKAGE):
            raise EngineNotFoundError(f"The engine has no module '{e.name}' yet") from e
        raise
    return types.SimpleNamespace(
        segment_image=pipeline.segment_image,
        compute_stats=stats.compute_stats,
        label_names_for=stats.label_names_for,
        figure_notes=stats.figure_notes,
        Cancelled=pipeline.Cancelled,
        SidedLungMask=lungstep.SidedLungMask,
        resolve_lobe_weights=lambda: lungstep.resolve_weights(
            None, lungstep.LOBE_WEIGHTS_ENV, "unet_ltrclobes-*.pth"),
    )


def engine_available(moduleDir=None):
    try:
        load_engine(moduleDir)
    except ImportError:
        return False
    return True


def run_segmentation(engine, ct, lungMethod, checkpoint, device, lungMask=None, progress=None, cancel=None,
                     flipTTA="model"):
    """``segment_image`` for one of the panel's lung methods (LUNG_METHODS) and mirrored-pass
    choices (FLIP_TTA).

    The engine's own methods are auto/lungmask/classical; "lobes" is lungmask with the
    LTRCLobes weights (severity per lobe), "existing" passes the user's lung mask — sided
    labels (1 right, 2 left, ``mrml.lung_mask_from_segmentation``), so a segmentation with one
    lung gives that lung alone instead of being split into two.
    """
    lungs, lobeWeights = lungMethod, None
    if lungMethod == "existing":
        if lungMask is None:
            raise ValueError("The 'existing segmentation' lung method needs a lung mask")
        lungs = "auto"
        lungMask = engine.SidedLungMask(lungMask)
    elif lungMethod == "lobes":
        lungs = "lungmask"
        lobeWeights = engine.resolve_lobe_weights()
        if lobeWeights is None:
            raise FileNotFoundError(
                "lungmask LTRCLobes weights not found: set SSALESIONSEG_LUNGMASK_LOBE_WEIGHTS to the "
                "unet_ltrclobes-*.pth file or place it in the torch hub cache")
    kwargs = {"lobe_weights": lobeWeights} if lobeWeights is not None else {}
    return engine.segment_image(ct, checkpoint=checkpoint, lungs=lungs, lung_mask=lungMask, device=device,
                                progress=progress, cancel=cancel, flip_tta=_FLIP_TTA_OVERRIDE[flipTTA], **kwargs)
