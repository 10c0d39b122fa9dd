"""Claims B1-B3 (Cohen et al. 2021; CDAT paper Fig. 1, 3, 5, 6) on a small CNN, full batch: 512 digits as images.

CNN: conv 3x3 (8 filters) - tanh - 2x2 average pool - conv 3x3 (8) - tanh - 2x2 average pool - dense, squared
error. Same claims and thresholds as reproduce_mlp.py (eos_core/demo/claims.py); figures in benchmarks/README.md.
On CPU, torch's convolution backward dominates the cost, hence 512 examples.

    python benchmarks/reproduce_cnn.py                    # defaults (a few minutes on 1 CPU core)
    python benchmarks/reproduce_cnn.py --steps 200        # a quick look
"""

import sys

from _reproduce_common import Defaults, main

DEFAULTS = Defaults(arch="cnn", width=8, steps=800, samples=512, grid="0.125,0.25,0.5,1,2", sharpness_every=7,
                    out="benchmarks/results/cnn")

if __name__ == "__main__":
    sys.exit(main(DEFAULTS, description=__doc__))
