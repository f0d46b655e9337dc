"""The priors over code maps by name, each with its config dataclass: what pixelcnn_prior.py builds
from its flags and what a prior checkpoint is rebuilt from."""
from dataclasses import asdict

from code_transformer import CodeTransformer, CodeTransformerConfig
from gated_pixelcnn import GatedPixelCNN, GatedPixelCNNConfig

PRIORS = {"gated_pixelcnn": (GatedPixelCNN, GatedPixelCNNConfig),
          "transformer": (CodeTransformer, CodeTransformerConfig)}


def prior_from_config(config):
    """A config of either prior -> that prior, freshly initialised."""
    network, _ = PRIORS[config.arch]
    return network(config)


def prior_config(saved):
    """A checkpoint's "model_config" dict -> the config of its arch."""
    _, config = PRIORS[saved["arch"]]   # KeyError or TypeError: checkpoints.config_from says so
    return config(**{key: value for key, value in saved.items() if key != "arch"})


def saved_config(config):
    """A prior's config -> the dict a checkpoint holds as "model_config" (with its arch)."""
    return {"arch": config.arch, **asdict(config)}
