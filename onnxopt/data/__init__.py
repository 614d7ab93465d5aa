"""Data that passes learn from: calibration readers, sample inputs, activation capture and
streamed, mergeable statistics (with their numba kernels)."""
