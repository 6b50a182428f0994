"""Experiments built on the library: data, models, training, sweeps, studies."""
