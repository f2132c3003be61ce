"""Typed errors: each names the file, column or record at fault and what was expected."""


class VaepipeError(Exception):
    """Base class: the CLI prints these as one clear line and exits with status 2."""


class InputError(VaepipeError):
    """A URI, file or data set that cannot be used (missing, empty, corrupt, not allowed)."""


class SchemaError(InputError):
    """A missing column, a column of the wrong type, or a vector of the wrong length."""


class BadRecordError(InputError):
    """Records whose values cannot be used (NaN, inf, null)."""


class ModelNotFoundError(VaepipeError):
    """A registered model, version or alias that does not exist."""


class ConfigError(VaepipeError):
    """A job configuration that breaks an invariant."""
