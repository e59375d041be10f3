"""Progress bars: frequent redraws on a terminal, few in a log file."""

import io
import sys

from tempme.progress import LOG_FILE_INTERVAL_S, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_a_redraw_at_most_every_interval(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(range(3), desc="x") as bar:
        assert bar.mininterval == LOG_FILE_INTERVAL_S
        list(bar)
    with progress_bar(total=2, mininterval=1.0) as bar:  # a caller's own interval stands
        assert bar.mininterval == 1.0


def test_a_terminal_gets_tqdms_usual_redraws(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    with progress_bar(total=2) as bar:
        assert bar.mininterval == 0.1


def test_nested_bars_in_a_log_file_draw_no_cursor_movements(monkeypatch):
    # A validation bar inside the training bar: tqdm places a second bar on the next line and moves
    # back up with escape codes, which a log file shows as garbage.
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar(total=2, desc="training", mininterval=0) as outer:
        outer.update()
        with progress_bar(range(3), desc="validation", mininterval=0) as inner:
            list(inner)
        outer.update()
    assert "validation" in log.getvalue() and "\x1b[A" not in log.getvalue()


def test_in_a_log_file_each_redraw_and_each_warning_has_a_line_of_its_own(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar(total=3, desc="encoding videos", mininterval=0) as bar:
        bar.update()
        sys.stderr.write("tempme: warning: skipping video 'x'\n")  # as the command line prints warnings
        bar.update(2)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "tempme: warning: skipping video 'x'" in lines
    assert all(line.startswith("encoding videos:") for line in lines if "warning" not in line)
