"""Training of the bundled demo model: the synthetic shapes dataset and its detector, the autoencoder and
diffusion stages, the evaluation, and the `minisd train` command (`minisd.train.cli.main`)."""
