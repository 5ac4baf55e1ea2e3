"""The Python API in one import: `import kbitcli.api as kbit; model, tok = kbit.load_model("out/x")`."""

from kbitcli.allocate.planner import plan
from kbitcli.calibration.data import Calibration
from kbitcli.decode import decode
from kbitcli.encode import encode
from kbitcli.inspect import inspect
from kbitcli.models.kbit_linear import KbitLinear
from kbitcli.models.hf_quantizer import register_with_transformers  # cheap: transformers loads on the call
from kbitcli.models.load import load_model
from kbitcli.recipes import Recipe, from_dict, load_recipe, with_flags

__all__ = ["Calibration", "encode", "plan", "decode", "inspect", "load_model", "KbitLinear", "Recipe", "load_recipe", "with_flags", "from_dict",
           "register_with_transformers"]
