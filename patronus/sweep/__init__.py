"""`patronus sweep`: a grid of attacks on a model and on its two references, every checkpoint evaluated.

  grid.py      what to run: `GridConfig` and the shipped grid files
  layout.py    where everything lives in a sweep directory (and `SweepError`)
  cell.py      one cell: attack one model (or reuse a shared attack), evaluate each checkpoint
  executors/   how cells run: in this process or in worker processes
  runner.py    `run_sweep`: resume, order the cells, hand them to an executor
  results.py   reading finished cells back (no torch: reports read sweeps cheaply)
"""
