"""CPU emulator of the CUDA kernels (see emulated.py)."""
