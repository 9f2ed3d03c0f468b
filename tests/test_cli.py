"""The job entry points' console: our lines and warnings on the terminal, everything in the log file."""

from __future__ import annotations

import logging

import pytest

from jobs.cli import configure_console


@pytest.fixture
def restore_logging():
    root, libraries = logging.getLogger(), [logging.getLogger(n) for n in ("ray", "ray.data", "ray.serve", "ray.train")]
    saved = (root.handlers[:], root.level, [(lg.handlers[:], lg.propagate) for lg in libraries])
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for lg, (handlers, propagate) in zip(libraries, saved[2]):
        lg.handlers[:], lg.propagate = handlers, propagate
    logging.captureWarnings(False)


@pytest.mark.parametrize("verbose", [False, True])
def test_console_shows_our_lines_and_warnings_and_the_file_gets_everything(tmp_path, capsys, restore_logging, verbose):
    log_file = tmp_path / "run" / "distill.log"
    configure_console(log_file, verbose)
    logging.getLogger("masters.distill").info("stage teacher-m/0 trained")
    logging.getLogger("ray.serve").info("CALL score_many OK")
    logging.getLogger("ray.data").info("Total Progress: 3/8")
    logging.getLogger("ray.train").warning("a worker died")
    logging.getLogger("py.warnings").warning("`ray_remote_args` is deprecated")
    for handler in logging.getLogger().handlers:
        handler.flush()
    console, written = capsys.readouterr().err, log_file.read_text()
    for line in ("stage teacher-m/0 trained", "CALL score_many OK", "Total Progress: 3/8", "a worker died", "deprecated"):
        assert line in written, line
    assert "stage teacher-m/0 trained" in console and "a worker died" in console
    for line in ("CALL score_many OK", "Total Progress: 3/8", "deprecated"):
        assert (line in console) == verbose, line
