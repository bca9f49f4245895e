"""Checkpoint conversion: sharded training checkpoints <-> consolidated safetensors, and MDLM import.

Every source is read into a :class:`PortableModel` (full weights by parameter name plus the config
that rebuilds the model); every target is written from one. ``python tools/convert_checkpoint.py``
is the command line; ``docs/mdlm-import.md`` documents the MDLM mapping.
"""

from .consolidated import CONFIG_FILE, WEIGHTS_FILE, load_consolidated_model, read_consolidated, write_consolidated
from .mdlm import import_mdlm, mdlm_parameter_names
from .mdlm_file import read_mdlm_file
from .portable import ConversionError, PortableModel
from .sharded import read_sharded, write_sharded

__all__ = ["CONFIG_FILE", "ConversionError", "PortableModel", "WEIGHTS_FILE", "import_mdlm", "load_consolidated_model",
           "mdlm_parameter_names", "read_consolidated", "read_mdlm_file", "read_sharded", "write_consolidated",
           "write_sharded"]
