"""Typed errors: each names the file, column or record at fault and what was expected."""


class VaepipeError(Exception):
    """Base class: the CLI prints these as one clear line and exits with `exit_code` (2)."""

    exit_code = 2


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


class LeaseHeldError(VaepipeError):
    """Another run holds the output's lease: one writer per output."""


class LeaseLostError(VaepipeError):
    """This run's lease was taken over (it stopped renewing past its expiry): nothing is committed."""


class ManifestError(InputError):
    """A manifest or state file in an output that is not what vaepipe writes (untrusted input)."""


class PartialFailure(VaepipeError):
    """Some units of a run (nightly partitions) failed; the others committed."""

    exit_code = 3

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result or {}
