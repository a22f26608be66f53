"""Error families. The launcher turns any PolarisError into one line and exit code 2."""


class PolarisError(Exception):
    """Base of every error a user can act on."""


class ConfigError(PolarisError):
    """A config key, value or conf name is wrong."""


class DataError(PolarisError):
    """A dataset file, row or field is wrong."""


class EnvironmentSetupError(PolarisError):
    """The machine or environment cannot run this config (missing key, no GPU, ...)."""


class JudgeError(PolarisError):
    """The judge cannot be reached or answers nonsense at start-up."""


class CheckpointError(PolarisError):
    """A checkpoint folder is missing, incomplete, or does not fit this run."""


class RoleLostError(PolarisError):
    """A role's actor died and could not be replaced (a learner rank, an engine past its restarts)."""


class WeightSyncError(PolarisError):
    """The weight broadcast group disagrees (version, tensor set), a transfer failed or ran past
    its deadline, or a sync failed verification."""
