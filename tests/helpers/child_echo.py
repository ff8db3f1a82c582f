"""A child for tests/test_child_process.py (`python -m tests.helpers.child_echo`): answers each message
("echo", x) with ("ok", x), ("sleep", s) after s seconds, ("die", signal) by that signal."""

import os
import time

from pipeline.io.child_process import channel, receive, send

if __name__ == "__main__":
    requests, replies = channel()
    print("a library's print goes to stderr, not into the replies")
    send(replies, ("ready", os.environ.get("CHILD_ECHO_TAG")))
    while (message := receive(requests)) is not None:
        op, arg = message
        if op == "sleep":
            time.sleep(arg)
        elif op == "die":
            os.kill(os.getpid(), arg)
        send(replies, ("ok", arg))
