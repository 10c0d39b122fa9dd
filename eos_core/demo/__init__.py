"""`eos-core demo`: full-batch training that shows the edge of stability, classical tuners and CDAT side by side.

The demo trains one small network full batch on an embedded dataset (scikit-learn's digits by default) with gradient
descent at the best constant learning rate of a small 2^i grid, the Armijo line search, `CDAT(scale=1)` (the
quadratically greedy rule, CDAT paper eq. 3) and `CDAT(scale=2)` (the on-edge rule, eq. 7), tracking the sharpness
lambda_max by warm-started power iteration. It prints a summary table and writes the 4-panel figure
([`eos_core.plotting.plot_edge_of_stability`][]) and the trajectories as CSV.

Layout: the numpy-only parts live in backend-neutral modules (`.data`, `.models`,
`.methods`, `.results`, `.progress`, `.runner`); `.torch_backend` and
`.jax_backend` train the same network from the same initial weights, and are imported only when
that backend is asked for. Nothing here is imported by `import eos_core`.
"""
