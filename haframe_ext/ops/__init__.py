"""The compiled ops and their Python faces: loading the extension, the fused HAFrame loss, and the hierarchical
losses (HXE, soft labels, the fused linear loss); ``haframe_ext.ops`` hands on the fused loss's names."""

from .fused import EPS, derive_similarity_or_gram, fused_loss, haframe_loss, paper_loss, reference_loss
from .fused_args import COSINE_SCALES, UNIT_ROW_TOL, as_alpha, as_cosine_scale, cosine_scale_for

__all__ = ["haframe_loss", "reference_loss", "paper_loss", "fused_loss", "derive_similarity_or_gram", "as_alpha",
           "as_cosine_scale", "cosine_scale_for", "COSINE_SCALES", "EPS", "UNIT_ROW_TOL"]
