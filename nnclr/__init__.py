"""nnclr: self-supervised contrastive learning of visual representations (NNCLR, SimCLR, KMCLR)."""

__version__ = "0.1.0"
