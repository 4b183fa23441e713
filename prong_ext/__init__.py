"""prong_ext: Natural Neural Networks (PRONG)."""
