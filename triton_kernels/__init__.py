"""Triton kernels of prong_ext and their launchers. Installed as `prong_ext.triton_kernels`."""
