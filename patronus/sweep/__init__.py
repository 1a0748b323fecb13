"""`patronus sweep`: a grid of attacks on a model and on its two references, every checkpoint evaluated.

  grid.py      what to run: `GridConfig` and the shipped grid files
  layout.py    where everything lives in a sweep directory (and `SweepError`)
  cell.py      one cell: attack one model (or reuse a shared attack), evaluate each checkpoint
  executors/   how cells run: in this process or in worker processes
  runner.py    `run_sweep`: resume, order the cells, hand them to an executor
  results.py   reading finished cells back (no torch: reports read sweeps cheaply)
  entry.py     `sweep`: any grid and model in, a `SweepResult` out (the CLI's and the API's)

`patronus.sweep` is both this package and the Python API's sweep function: Python binds the
package to that name as soon as any of its modules is imported, so the package is callable and
`patronus.sweep(model, out, grid="default", ...)` runs `entry.sweep`. Calling it imports
torch; importing the package does not.
"""

import sys
import types


class _CallableSweep(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from patronus.sweep.entry import sweep

        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableSweep
