"""Size thresholds shared by the frame, the loss, the modules and the benchmarks (one home for each rule)."""

__all__ = ["DENSE_MAX_K"]

# Above this many classes nothing K x K is built: a frame keeps no similarity or distance matrix (rows of S
# come from its tree), the loss takes its d x d route for unit rows, the modules keep no S, the type-II
# layer is as wide as the frame instead of K, and frame quality is measured on sampled pairs.  At 4096
# classes a float64 K x K matrix is 128 MiB.
DENSE_MAX_K = 4096
