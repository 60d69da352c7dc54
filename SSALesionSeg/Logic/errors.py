"""Exceptions of the engine. ``InputError`` subclasses ValueError so command-line front ends
that report ValueErrors as clean one-line errors need no special case."""


class SSALesionSegError(Exception):
    """Base class of the engine's own errors."""


class InputError(SSALesionSegError, ValueError):
    """The input (CT, lung mask, labelmap, output folder) cannot be used as given."""


class LungWeightsError(SSALesionSegError, ValueError):
    """lungmask weights were asked for but cannot be found or loaded."""


class Cancelled(SSALesionSegError):
    """The caller's ``cancel()`` returned True; nothing was written."""


class FallbackWarning(UserWarning):
    """A lesser method was used (e.g. the classical lungs because lungmask has no weights)."""
