"""Device kernels. `reference.py` holds the torch twin of every kernel; GPU kernels live beside it."""
