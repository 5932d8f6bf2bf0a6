from lightning_modules.losses.contrastive import ContrastiveLoss
from lightning_modules.losses.gather import gather_positives

__all__ = ["ContrastiveLoss", "gather_positives"]
