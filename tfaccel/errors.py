"""Errors a user can act on. Each message names what was wrong and what to do about it."""


def first_line(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters): what a report or a progress line
    keeps of an error."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:limit]


class TfaccelError(Exception):
    """Base class for problems the user can fix. The CLI prints the message and exits non-zero."""


class SourceError(TfaccelError):
    """A model source could not be loaded (missing path, unknown format, not a Keras model...)."""


class DataFileError(SourceError):
    """A user's data file (eval, calibration or fine-tuning data) cannot be used: missing, unreadable,
    empty, or its names, dtypes, lengths or labels do not fit the model. The message names the file."""


class OutputError(TfaccelError):
    """An output path cannot be written or replaced (it exists, is a file, is not tfaccel's to replace, its
    parent is missing or read-only). Nothing was written."""


class InputMismatchError(TfaccelError):
    """Sample inputs do not match the model's input names, dtypes or ranks."""


class PlanError(TfaccelError):
    """The list of steps cannot run on this source (unknown step, wrong order, wrong artifact kind)."""


class StepError(TfaccelError):
    """A step could not produce its artifact."""


class OverBudget(StepError):
    """A step stopped because its measured progress says it would not finish before its deadline
    (``StepContext.deadline``, e.g. ``--auto``'s time budget). ``projected_s`` and ``max_seconds`` say
    by how much."""

    def __init__(self, message: str, projected_s: float = float("nan"), max_seconds: float = float("nan")):
        super().__init__(message)
        self.projected_s, self.max_seconds = projected_s, max_seconds


class ValidationError(TfaccelError):
    """A stage's outputs breached its tolerance against the reference model."""


class MissingDependencyError(TfaccelError, ImportError):
    """An optional dependency is not installed. The message says what to install."""
