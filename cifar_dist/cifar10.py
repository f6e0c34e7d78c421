"""Facts about CIFAR-10 that every stage shares: its classes, image size and channel statistics."""
from __future__ import annotations

NUM_CLASSES = 10
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SIZE = 32
# Per-channel mean and std of the 50,000 training images, pixels scaled to [0, 1].
CHANNEL_MEAN = (0.4914, 0.4822, 0.4465)
CHANNEL_STD = (0.2470, 0.2435, 0.2616)
