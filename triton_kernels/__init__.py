"""Triton kernels of prong_ext and their launchers. Installed as `prong_ext.triton_kernels`.

    covariance     `_cov_accum_kernel`; `cov_accumulate` (shifted s1, s2 sums, one launch),
                   `covariance`, `finalize`
    whiten_conv    `_fold_kernel`, `_fold_bwd_kernel`; `fold_weights` (W = V U, b = d - W c),
                   `fold_weights_backward`
    compile_check  `python -m prong_ext.triton_kernels.compile_check`: AOT-compiles every kernel
                   configuration for sm_90 and sm_80 without a GPU

Nothing is imported here: kernels are defined at the import of their module, after the caller has
chosen TRITON_INTERPRET. Imports inside this folder are relative; it never imports prong_ext.
"""
