"""minisd: Stable Diffusion from scratch in PyTorch, small enough to read, exact enough to load real checkpoints."""
from .config import ModelConfig
from .errors import CheckpointError, MinisdError, ParameterError, UnsupportedModelError
from .pipeline import StableDiffusion, load

__version__ = "0.1.0"
__all__ = ["load", "StableDiffusion", "ModelConfig", "MinisdError", "CheckpointError", "UnsupportedModelError", "ParameterError",
           "__version__"]
