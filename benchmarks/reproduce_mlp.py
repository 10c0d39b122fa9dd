"""Claims B1-B3 (Cohen et al. 2021; CDAT paper Fig. 1, 3, 5, 6) on an MLP, full batch: digits, 64-64-64-10 tanh.

B1 constant lr: progressive sharpening, then lambda_max within 10% of 2/lr. B2 Armijo and CDAT(scale=1):
the lr falls, the sharpness keeps rising, the final loss is worse than the best constant lr of the 2^i grid.
B3 CDAT(scale=2) and CDAT(scale=2.0625): final loss <= the best constant lr's, the lr rises early like a
warm-up, the sharpness does not run away. Thresholds: eos_core/demo/claims.py. Figures: benchmarks/README.md.

    python benchmarks/reproduce_mlp.py                    # defaults (a few minutes on 1 CPU core)
    python benchmarks/reproduce_mlp.py --steps 200        # a quick look
    python benchmarks/reproduce_mlp.py --backend jax
"""

import sys

from _reproduce_common import Defaults, main

DEFAULTS = Defaults(arch="mlp", width=64, steps=1500, samples=None, grid="0.125,0.25,0.5,1,2", sharpness_every=7,
                    out="benchmarks/results/mlp")

if __name__ == "__main__":
    sys.exit(main(DEFAULTS, description=__doc__))
