"""Hierarchy-aware frames: the target similarity S and s_min, unit vectors with a given Gram matrix, frame quality
measures and :class:`HAFrame`; ``haframe_ext.frame`` hands on the names users need."""

from ..sizes import DENSE_MAX_K
from .frame import HAFrame
from .profile import Profile, fitted_profile
from .similarity import etf_similarity, exact_s_min, grid_s_min, similarity_matrix

__all__ = ["HAFrame", "Profile", "fitted_profile", "similarity_matrix", "exact_s_min", "grid_s_min", "etf_similarity",
           "DENSE_MAX_K"]
