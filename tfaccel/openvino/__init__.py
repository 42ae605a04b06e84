"""OpenVINO: SavedModel -> OpenVINO IR (``openvino``), NNCF int8 of that IR (``ov-int8``), the runner that
compiles an IR for the CPU plugin with explicit settings, and a serve check in a process with only OpenVINO.
Needs the ``openvino`` extra (``pip install 'tfaccel[openvino]'``): openvino and nncf."""

from tfaccel.openvino.ir import OPENVINO_KIND, OpenVINORunner, convert_saved_model, is_ir
from tfaccel.openvino.serve import check_openvino_servable
from tfaccel.openvino.steps import OpenVINOInt8Step, OpenVINOStep

__all__ = ["OPENVINO_KIND", "OpenVINOInt8Step", "OpenVINORunner", "OpenVINOStep", "check_openvino_servable",
           "convert_saved_model", "is_ir"]
