"""Convert checkpoints: sharded (any layout) <-> consolidated safetensors, and MDLM import.

    python tools/convert_checkpoint.py runs/owt/checkpoints/step-00010000 export/owt --weights ema
    python tools/convert_checkpoint.py export/owt runs/owt-finetune --to sharded --config configs/owt-small.yaml
    python tools/convert_checkpoint.py mdlm.ckpt export/mdlm --from mdlm --scheduler mdlm

The logic lives in ``lomdm_dist.convert`` (``python tools/convert_checkpoint.py --help`` lists the
options; ``docs/mdlm-import.md`` the MDLM mapping). Exit status 2 with a one-line reason on error.
"""

from __future__ import annotations

import sys

from lomdm_dist.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
