"""Qt-free parts of the SSALesionSeg Slicer module.

Kept in a sub-package because Slicer tries to load every ``.py`` file that sits
directly in a module folder as a module of its own.
"""
