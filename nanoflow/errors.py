"""The exceptions users see: each says what is wrong and what to do about it."""


class NanoflowError(Exception):
    """Base of every error nanoflow raises on purpose."""


class ConfigError(NanoflowError, ValueError):
    """An engine option, model name or model config that cannot be used."""


class CheckpointError(NanoflowError):
    """A checkpoint that is missing, truncated or does not match the model."""


class ProfileError(NanoflowError):
    """A tuning profile that is corrupt, outdated or made for another model or GPU."""


class RequestError(NanoflowError, ValueError):
    """A request that cannot be served as asked (bad sampling params, prompt too long...)."""


class ScheduleError(NanoflowError, ValueError):
    """A pipeline schedule that does not describe a valid nano-batch pipeline."""
