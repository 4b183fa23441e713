"""Triton kernels of prong_ext and their launchers. Installed as `prong_ext.triton_kernels`.

    covariance     `cov_accum_kernel`: shifted sums s1, s2 of a layer input's rows, one launch
                   per 2^30 rows; `cov_accumulate_launches` (grids and arguments),
                   `cov_accumulate` (runs them)
    whiten_conv    `fold_kernel`, `fold_bwd_kernel`: W = V U, b = d - W c and its adjoint;
                   `fold_weights_launch`, `fold_weights_backward_launch`, `fold_weights`,
                   `fold_weights_backward`
    compile_check  `python -m prong_ext.triton_kernels.compile_check`: AOT-compiles every kernel
                   configuration for sm_90 and sm_80 without a GPU

prong_ext._triton_ops registers the launches as torch.library ops. Nothing is imported here:
kernels are defined at the import of their module, after the caller has chosen TRITON_INTERPRET.
Imports inside this folder are relative; it never imports prong_ext.
"""
