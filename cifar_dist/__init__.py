"""cifar_dist: distributed CIFAR-10 training, from the raw files to a trained, evaluated model."""
__version__ = "0.1.0"
