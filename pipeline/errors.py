"""The one base class of faceopt's user errors."""


class FaceoptError(Exception):
    """A mistake in what was asked or given (a setting, the data, a study, photos): `faceopt`
    prints its message alone and exits 2. Any other exception is a bug and keeps its traceback."""


class SettingError(FaceoptError, ValueError):
    """A setting this machine or this library cannot honour (an unknown sampler, fp16 on a CPU)."""
