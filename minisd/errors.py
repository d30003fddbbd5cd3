"""The exceptions minisd raises for bad input; the CLI turns each into one line on stderr and exit code 2."""


class MinisdError(Exception):
    """Base class: a problem with what the user gave us, explained in the message."""


class CheckpointError(MinisdError, ValueError):
    """A model file or folder that cannot be loaded: missing, corrupt, truncated, unsafe, inconsistent."""


class UnsupportedModelError(CheckpointError):
    """A checkpoint of an architecture minisd recognises but does not run (yet), or does not know."""


class ParameterError(MinisdError, ValueError):
    """A generation parameter out of range or of the wrong kind (size, steps, strength, sampler, ...)."""
