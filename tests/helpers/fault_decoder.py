"""An isolated decoder that injects real faults: a segfault, a hang and a memory hog, chosen by the file name.
Run as the decoder child with PIPELINE_TEST_DECODER_MODULE=tests.helpers.fault_decoder (or
DecoderProcess(module="tests.helpers.fault_decoder")); the repo root is on the child's path."""

import ctypes
import time

from pipeline.media.decoder_process import serve
from pipeline.media.fetch import fetch_and_decode


def faulty_decode(**request):
    name = request["uri"].rsplit("/", 1)[-1]
    if name.startswith("segfault"):
        ctypes.string_at(0)  # reads address 0: SIGSEGV, a real crash of the process
    if name.startswith("hang"):
        time.sleep(3600)
    if name.startswith("hog"):
        hog = bytearray(16 * 2**30)  # past the child's memory limit: MemoryError, not a dead worker
        del hog
    return fetch_and_decode(**request)


if __name__ == "__main__":
    serve(faulty_decode)
