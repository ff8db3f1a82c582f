"""Media: URI -> RGB frames. fetch opens the URI and dispatches on the bytes; image (Pillow) and
video (PyAV, sampled by seeking) decode; containers guards against what a file's boxes declare;
decoded holds the result and error types; decoder_process runs all of it in an isolated child."""
