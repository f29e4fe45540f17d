"""Fine-tuning on several devices: :func:`fit_ddp` (torch DistributedDataParallel)."""

from ._distributed import fit_ddp

__all__ = ["fit_ddp"]
