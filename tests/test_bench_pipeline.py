"""bench_pipeline's per-stage times: each stage runs from its 'Running stage' line to the next one or the end."""
import os
import sys

import pytest

from bench.bench_pipeline import run_timed

SCRIPT = """
import time
print("Running stage 'first':")  # no flush: run_timed's PYTHONUNBUFFERED must deliver it at once
time.sleep(0.4)
print("some stage output")
print("Running stage 'second':")
time.sleep(0.2)
"""


def test_stage_times_span_from_each_running_line_to_the_next(tmp_path):
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a plain shell would have it
    seconds, out, stage_s = run_timed([sys.executable, "-c", SCRIPT], tmp_path, buffered)
    assert list(stage_s) == ["first", "second"] and "some stage output" in out
    assert stage_s["first"] >= 0.4 and stage_s["second"] >= 0.2
    assert seconds >= stage_s["first"] + stage_s["second"] - 0.1  # rounding to 0.1 s


def test_a_failing_command_stops_with_its_output(tmp_path):
    with pytest.raises(SystemExit, match=r"exit 3[\s\S]*boom"):
        run_timed([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path, dict(os.environ))
