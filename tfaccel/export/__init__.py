"""SavedModel export with a named, dynamically shaped ``serving_default`` signature."""

from tfaccel.core.artifact import serving_signature
from tfaccel.export.saved_model_export import ExportStep, export_saved_model

__all__ = ["ExportStep", "export_saved_model", "serving_signature"]
