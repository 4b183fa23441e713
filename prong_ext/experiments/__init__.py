"""The paper's experiments (Desjardins et al. 2015, Sec. 4), run by ``python -m prong_ext``.

One module per subcommand, each with ``add_arguments(parser)`` and ``run(args, out)``:
``autoencoder`` (Sec. 4.2, Fig. 3), ``fisher`` (Sec. 4.1, Fig. 2), ``sweep`` (Fig. 3a-b), ``cnn``
(a small VGG-like convnet), ``race`` (the auto-encoder's methods at their best rates over seeds,
stepped in turn). A run builds a ``training.Task`` (model builder, data, loss,
evaluation), trains methods with ``Task.run`` and writes its outputs through ``report``.

The shared pieces, one home each:

- ``methods``: the method registry (sgd, rmsprop, bn, prong, prong+ and their Adam forms): model
  variant, optimizer, whether Prong manages it and with which eps, default learning rates;
  ``setup`` builds one.
- ``training``: the training loop (``train``), the Task, RunResult, seeding and minibatches.
- ``report``: CSV, plots, tables and ``write_summary`` (summary.md, summary.csv, the printout).
- ``common``: inputs (data sets, shared command-line options, ProngConfig) and provenance
  (versions, git commit, run.json).
"""
