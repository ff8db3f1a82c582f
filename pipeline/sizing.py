"""The old spelling of `python -m pipeline.planning.sizing`, kept so that scripts written for it run."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("pipeline.planning.sizing", run_name="__main__")
