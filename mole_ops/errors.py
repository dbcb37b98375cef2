"""Typed errors: each says what failed, where (file, key) and how to fix it."""


class MoLEError(Exception):
    """Base of every error this package raises on purpose."""


class FormatError(MoLEError):
    """A file is not what its format module expects (missing, unexpected or mis-shaped keys, bad values)."""


class MismatchError(MoLEError):
    """Experts, gates and model do not fit together (layers, names, order, shapes or base model)."""
