"""Layers, networks, numerical gradients, optimizers and MNIST data on any gradgap backend."""

from nets.networks import MultiLayerNet, TwoLayerNet

__all__ = ["MultiLayerNet", "TwoLayerNet"]
