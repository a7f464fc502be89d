"""A service that never becomes ready shows its threads' stacks (SIGUSR1) and keeps running."""

from devtools.procs import Proc


def test_thread_dump_shows_every_threads_stack_and_the_process_goes_on() -> None:
    proc = Proc("tests.devtools.sleeper", {})
    try:
        proc.wait_for(lambda out: "ready" in out, timeout=30)
        dump = proc.thread_dump()
        assert "_named_wait" in dump  # the extra thread's frame
        assert "<module>" in dump  # the main thread's
        assert proc.popen.poll() is None  # a dump does not stop it
    finally:
        proc.kill()
    assert proc.thread_dump() == ""  # nothing to ask once it has exited
