"""``write_report(run_dir)``: read a run directory, draw every section, write one self-contained HTML file.

The report never needs the training data unless galleries are asked for (``galleries=True``, the
default); it then loads the run's own data set offline and says which splits it used. Every
missing piece (no checkpoint, no evaluation yet, no labels, data not found) becomes a sentence in
the report instead of an error.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from nnclr import rundir
from nnclr.report import html as H
from nnclr.report.data import read_run
from nnclr.report.run_sections import evaluation_section, get, summary_section, training_section
from nnclr.report.visuals import visual_sections
from nnclr.rundir import REPORT
from nnclr.version import __version__


def write_report(run_dir: str | Path, out: str | Path | None = None, galleries: bool = True) -> Path:
    """Write the HTML report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``); returns its path.

    Args:
        run_dir: a run directory of ``nnclr pretrain``.
        out: the HTML file to write.
        galleries: load the run's training split for the neighbour galleries and the KMCLR prototype
            members (False: only the test split is loaded, for the embedding map).

    Raises:
        UserError: ``run_dir`` is not a run directory, or ``out`` cannot be written.
    """
    started = time.perf_counter()
    run = read_run(run_dir)
    out = Path(out).expanduser() if out else run.run_dir / REPORT
    visual, data_used = visual_sections(run, galleries)
    sections = [("summary", "Summary", summary_section(run, data_used)),
                ("training", "Training", training_section(run)),
                ("evaluation", "Evaluation", evaluation_section(run)), *visual]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (f"{H.esc(run.run_dir.resolve())} &middot; written {generated} by nnclr {__version__} "
                f"in {time.perf_counter() - started:.0f} s")
    title = f"nnclr report: {run.method} on {get(run.config, 'data.name')}"
    document = H.page(title, subtitle, sections, list(run.missing.values()))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise rundir.disk_error(out, error, "the report") from None
    rundir.write_text_atomic(out, document, what="the report")  # never through a link planted at its name
    return out
