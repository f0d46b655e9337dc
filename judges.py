"""The judges of generated digits: two differently built MNIST classifiers (classifier.py trains
them, sample_quality.py asks them). Each maps images (B, 1, 28, 28) in [-1, 1] to logits (B, 10),
and `features` gives the 128-d penultimate activations its Frechet distances are measured in."""
from dataclasses import dataclass

import torch.nn as nn


class MNISTClassifier(nn.Module):
    """The CNN judge (classifier.py --arch cnn)."""

    num_features = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 3 * 3, self.num_features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.num_features, 10))

    def features(self, images):
        return self.body(images)

    def forward(self, images):
        return self.head(self.body(images))


class MNISTMLPClassifier(nn.Module):
    """The second judge (classifier.py --arch mlp): a multilayer perceptron on the raw pixels, with
    no convolution, so that it errs differently from the CNN."""

    num_features = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(28 * 28, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(512, self.num_features), nn.BatchNorm1d(self.num_features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.num_features, 10))

    def features(self, images):
        return self.body(images)

    def forward(self, images):
        return self.head(self.body(images))


JUDGES = {"cnn": MNISTClassifier, "mlp": MNISTMLPClassifier}


@dataclass
class JudgeConfig:
    arch: str = "cnn"    # a key of JUDGES

    def __post_init__(self):
        if self.arch not in JUDGES:
            raise ValueError(f"no judge arch {self.arch!r}")


def judge_from_config(config):
    return JUDGES[config.arch]()
