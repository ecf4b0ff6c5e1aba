"""sdtrt: Stable Diffusion export (``sdtrt.export``), lean runtime (``sdtrt.runtime``) and benchmarks.

Importing this package imports nothing heavy; torch is only loaded by ``sdtrt.export``.
"""

__version__ = "0.1.0"
