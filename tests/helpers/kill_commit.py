"""Commit a staged run and die (os._exit, as SIGKILL would) just before its Nth write to the store.

    python -m tests.helpers.kill_commit CONFIG.json N [SUPERSEDES.json]     # from the repo root

CONFIG.json is a RunConfig (model_dump_json) whose staging folder holds a finished run. A write is
a change to the store: locally a file opened for writing, a rename, a delete, a mkdir (Python's
audit events); on S3 a PUT, copy or delete request (botocore's before-call events). A local file
opened for writing when the process dies is cut to half its size, as a crash mid-write leaves it.
Exit code 137 when it died, 0 when the commit finished in fewer than N writes.
"""

from __future__ import annotations

import os
import sys

from pipeline.config import RunConfig
from pipeline.output import commit
from pipeline.output.location import OutputLocation

S3_WRITES = {"PutObject", "CopyObject", "DeleteObject", "DeleteObjects", "CreateMultipartUpload",
             "UploadPart", "UploadPartCopy", "CompleteMultipartUpload"}
LOCAL_WRITES = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "shutil.copyfile", "os.link"}


def _is_write_open(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


class Killer:
    def __init__(self, die_at: int):
        self.die_at, self.writes, self.open_for_write = die_at, 0, None

    def step(self) -> None:
        self.writes += 1
        if self.writes >= self.die_at:
            self.die()

    def die(self) -> None:
        cut, self.open_for_write = self.open_for_write, None  # os.truncate is an audit event too
        if cut and os.path.isfile(cut):
            os.truncate(cut, os.path.getsize(cut) // 2)
        os._exit(137)

    def audit(self, event: str, args) -> None:
        if self.open_for_write:  # the first event after the fatal open: the file is being written
            self.die()
        if event == "open" and args[0] is not None and _is_write_open(args[1], args[2]):
            self.writes += 1
            if self.writes >= self.die_at:
                self.open_for_write = os.fsdecode(args[0]) if not isinstance(args[0], int) else None
                if self.open_for_write is None:
                    self.die()
        elif event in LOCAL_WRITES:
            self.step()

    def before_call(self, model, **_) -> None:
        if model.name in S3_WRITES:
            self.step()


def main(argv=None) -> int:
    import json

    args = argv or sys.argv[1:]
    config, die_at = args[:2]
    supersedes = json.loads(open(args[2]).read()) if len(args) > 2 else None  # {committed file: [ids]} the run replaces
    with open(config) as f:
        cfg = RunConfig.model_validate_json(f.read())
    out = OutputLocation.of(cfg.output, cfg.storage)
    result = commit.staged(out, cfg.run_id)
    killer = Killer(int(die_at))
    if out.is_local:
        sys.addaudithook(killer.audit)
    else:
        from fsspec.asyn import sync

        sync(out.fs.loop, out.fs.set_session)
        out.fs.s3.meta.events.register("before-call.s3", killer.before_call)
    commit.commit(out, cfg, result, {"run_id": cfg.run_id}, supersedes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
