"""ssanet: the SSA-Net training kit of SSALesionSeg (network, losses, metrics, data, training)."""

__version__ = "0.1.0"
