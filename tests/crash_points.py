"""Kill a process at each of its file-system steps in turn: the harness of the crash-safety tests.

Runs inside a fresh interpreter (the tests start one with `python -c`): it forks, and a forked child must not
inherit thread pools, so callers set `torch.set_num_threads(1)` first."""

import os
import signal


def kill_at_each_step(steps: list, prepare, act, observe) -> list:
    """For k = 1, 2, ...: run `prepare()`, fork a child that runs `act()` and is killed with SIGKILL just before
    its k-th call of any of `steps` ((owner, attribute name) pairs), then record `observe() + [killed]`. Stops after
    the first k at which `act()` finishes; returns the records."""
    seen, k = [], 0
    while True:
        k += 1
        prepare()
        pid = os.fork()
        if pid == 0:
            calls = [0]

            def wrap(function):
                def killing(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return function(*args, **kwargs)

                return killing

            for owner, name in steps:
                if hasattr(owner, name):
                    setattr(owner, name, wrap(getattr(owner, name)))
            act()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        seen.append([*observe(), os.WIFSIGNALED(status)])
        if not os.WIFSIGNALED(status):
            return seen
