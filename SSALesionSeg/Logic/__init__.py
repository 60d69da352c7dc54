"""SSALesionSeg engine (pure Python, no Qt): CT -> lungs -> SSA-Net -> labelmap -> segments/stats/report."""
