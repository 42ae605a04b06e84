"""tfaccel: move a TensorFlow/Keras BERT or GPT model step by step to an optimized SavedModel.

Every step is validated against the original model and measured on the machine at hand.

Example:
    >>> import tfaccel
    >>> source = tfaccel.load_source("bert-tiny")
    >>> report = tfaccel.Pipeline(["export"], shapes=[(1, 16)]).run(source, "out")
    >>> report.final_saved_model  # doctest: +SKIP
    'out/saved_model'
"""

__version__ = "0.1.0"

from tfaccel.auto import optimize, optimize_auto
from tfaccel.compat import capabilities
from tfaccel.core.source import ModelSource
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.errors import (
    InputMismatchError,
    MissingDependencyError,
    PlanError,
    SourceError,
    StepError,
    TfaccelError,
    ValidationError,
)
from tfaccel.pipeline import Pipeline
from tfaccel.sources import load_source
from tfaccel.steps import available_steps, get_step

__all__ = [
    "InputMismatchError",
    "MissingDependencyError",
    "ModelSource",
    "Pipeline",
    "PlanError",
    "SourceError",
    "Step",
    "StepContext",
    "StepError",
    "TfaccelError",
    "Tolerance",
    "ValidationError",
    "__version__",
    "available_steps",
    "capabilities",
    "get_step",
    "load_source",
    "optimize",
    "optimize_auto",
]
