"""The fault matrix in its reduced CI form: one trial per cell (``RAYEDIT_FAULT_TRIALS`` for more; the full
form with a table is ``benchmarks/faults.py --trials N``). See ``faultmatrix.py`` for what each cell does
and what "survived" means. One Ray cluster, one S3 server + fault proxy and one reference run serve
every cell; the cells run two at a time (``RAYEDIT_FAULT_LANES``), and each test checks one cell."""

from __future__ import annotations

import os
from pathlib import Path

import faultmatrix as fm
import pytest

TRIALS = int(os.environ.get("RAYEDIT_FAULT_TRIALS", "1"))
LANES = int(os.environ.get("RAYEDIT_FAULT_LANES", "2"))
SEED = int(os.environ.get("RAYEDIT_FAULT_SEED", "0"))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], fm.Trial]:
    h = fm.start_harness(Path(tmp_path_factory.mktemp("faultmatrix")))
    try:
        trials = fm.run_matrix(h.ctx, list(fm.CELLS), TRIALS, SEED, LANES,
                               on_trial=lambda t: print(f"{t.cell} trial {t.trial}: survived={t.survived} "
                                                        f"({t.seconds:.0f} s)", flush=True))
    finally:
        h.stop()
    return {(t.cell, t.trial): t for t in trials}


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("cell", list(fm.CELLS))
def test_fault_cell(matrix: dict[tuple[str, int], fm.Trial], cell: str, trial: int) -> None:
    t = matrix[(cell, trial)]
    summary = (f"{cell} trial {trial}: survived={t.survived} lost={t.rows_lost} dup={t.rows_dup} "
               f"{t.seconds:.0f}s {t.phases}\n  fault: {t.fault}\n  message: {t.message}")
    print(summary)
    assert not t.problems, summary + "\n  problems:\n  - " + "\n  - ".join(t.problems)
    assert t.survived and t.rows_lost == 0 and t.rows_dup == 0, summary
    assert t.fault, summary  # the fault really happened, and we can say what it was
    assert t.message, summary  # and something told the user what happened or what was retried
