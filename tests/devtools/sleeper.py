"""A process that only waits, with the services' SIGUSR1 thread dump on: what
test_thread_dump asks for its stacks."""

import threading
import time

from services.common.runtime import dump_threads_on_sigusr1


def _named_wait() -> None:
    time.sleep(60)


if __name__ == "__main__":
    dump_threads_on_sigusr1()
    threading.Thread(target=_named_wait, name="waiter", daemon=True).start()
    print("ready", flush=True)
    time.sleep(60)
