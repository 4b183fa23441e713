"""The paper's experiments (Desjardins et al. 2015, Sec. 4), run by ``python -m prong_ext``.

One module per subcommand: ``autoencoder`` (Sec. 4.2, Fig. 3), ``fisher`` (Sec. 4.1, Fig. 2),
``sweep`` (Fig. 3a-b), ``cnn`` (a small VGG-like convnet); ``common`` holds the shared training
loop, optimizers, CSV/plot/markdown writers.
"""
