"""The rank log handler keeps records logged from a signal handler.

submitit calls TrainTask.checkpoint() from its SIGUSR2 handler; the interrupted main thread
may be writing to the same rank log at that moment. With logging.FileHandler that record is
lost ("reentrant call inside BufferedWriter", seen in CI). A real timer signal, fired every
millisecond while the main thread logs long lines, exercises exactly that (the same script
with logging.FileHandler kept 28 of 300 marker lines).
"""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging, signal, sys
    from magseg_hpc.logfile import AppendFileHandler

    handler = AppendFileHandler({path!r})
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("rank")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    calls = 0

    def on_signal(signum, frame):
        global calls
        calls += 1
        log.info("marker %d", calls)

    signal.signal(signal.SIGALRM, on_signal)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    line = "x" * 65536
    while calls < 300:
        log.info(line)
    signal.setitimer(signal.ITIMER_REAL, 0)
    handler.close()
    print(calls)
""")


def test_records_logged_from_a_signal_handler_are_all_written(tmp_path):
    path = tmp_path / "rank0.log"
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(path=str(path))],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    calls = int(run.stdout.split()[-1])
    lines = path.read_text().splitlines()
    markers = [x for x in lines if x.startswith("marker ")]
    assert all(x == "x" * 65536 for x in lines if not x.startswith("marker ")), "torn line"
    assert len(markers) == calls >= 300
    assert "Logging error" not in run.stderr


def test_loggers_sent_to_a_file_are_quiet_again_after_the_block(tmp_path, capsys):
    """A child logger that logged INFO in the block is filtered again after it (logging
    caches isEnabledFor per logger: a level restored by assignment kept passing INFO)."""
    import logging

    from magseg_hpc.logfile import loggers_to_file

    parent, child = logging.getLogger("magseg-test-parent"), logging.getLogger(
        "magseg-test-parent.child")
    parent.setLevel(logging.WARNING)
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger().addHandler(handler)
    try:
        with loggers_to_file(["magseg-test-parent"], tmp_path / "cluster.log"):
            child.info("in the block")
        child.info("after the block")
    finally:
        logging.getLogger().removeHandler(handler)
    assert "in the block" in (tmp_path / "cluster.log").read_text()
    assert seen == []
    assert parent.level == logging.WARNING and parent.propagate
