"""Mini-batch benchmark suite: CDAT and the library's laws against tuned schedules and learning-rate-free peers.

Three CPU-sized tasks with offline data (`benchmarks.minibatch.tasks`), every method of
`benchmarks.minibatch.methods` (AdamW warm-up + cosine and constant Adam over lr grids, Prodigy,
D-Adaptation Adam, schedule-free AdamW, DoG / LDoG with iterate averaging, the library's laws through
`CurvatureTuner` and the mini-batch CDAT prototypes of `benchmarks.minibatch.prototypes`), one JSON per
run, a markdown table and a figure per task (`benchmarks.minibatch.report`). Entry point:

    python -m benchmarks.minibatch.run --task chargpt --seeds 0 1 --out benchmarks/results/minibatch
"""
