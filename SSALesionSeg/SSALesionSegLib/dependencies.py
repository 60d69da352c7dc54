"""First-use installation of the Python packages the engine needs inside Slicer.

Slicer ships its own SimpleITK, and torch comes from the PyTorch extension (which
picks the build matching the GPU driver); pip must never replace either. So torch
is installed through PyTorchUtils, and lungmask - which lists torch and SimpleITK
as requirements - is installed with ``--no-deps`` followed by its other
requirements one by one.

The Slicer-specific actions (asking, pip, PyTorchUtils) are passed in, which keeps
this testable without Slicer.
"""

import importlib.util

# lungmask's requirements other than torch and SimpleITK, as (import name, pip name).
LUNGMASK_REQUIREMENTS = [
    ("numpy", "numpy"),
    ("scipy", "scipy"),
    ("skimage", "scikit-image"),
    ("fill_voids", "fill_voids"),
    ("more_itertools", "more-itertools"),
    ("tqdm", "tqdm"),
    ("pydicom", "pydicom"),
]
PROTECTED = ("torch", "SimpleITK")
TORCH_REQUIREMENT = ">=2.0"


def is_installed(importName):
    return importlib.util.find_spec(importName) is not None


def missing_packages(isInstalled=is_installed):
    """What is missing, as a list of (import name, how to install it)."""
    missing = []
    if not isInstalled("torch"):
        missing.append(("torch", "PyTorch extension"))
    if not isInstalled("lungmask"):
        missing.append(("lungmask", "lungmask --no-deps"))
    for importName, pipName in LUNGMASK_REQUIREMENTS:
        if not isInstalled(importName):
            missing.append((importName, pipName))
    return missing


def ensure_dependencies(confirm, pipInstall, installTorch, isInstalled=is_installed):
    """Install what is missing after asking once.

    confirm(text) -> bool; pipInstall(requirementString); installTorch() -> module or
    None. Returns False if the user declined. Raises RuntimeError if torch could not
    be installed.
    """
    missing = missing_packages(isInstalled)
    if not missing:
        return True
    listing = ", ".join(name for name, _ in missing)
    if not confirm(f"SSA-Net lesion segmentation needs these Python packages: {listing}.\n\n"
                   "Install them now? This may take several minutes.\n"
                   "Slicer's torch and SimpleITK will not be replaced."):
        return False
    for importName, how in missing:
        if importName == "torch":
            if installTorch() is None:
                raise RuntimeError("PyTorch could not be installed. Install the 'PyTorch' extension "
                                   "from the Extensions Manager, restart Slicer and try again.")
        else:
            if any(how.split()[0].lower() == protected.lower() for protected in PROTECTED):
                raise AssertionError(f"refusing to pip-install protected package {how}")
            pipInstall(how)
    return True
