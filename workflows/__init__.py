"""workflows — CLI, batch runs over folders of slides, demo."""

if __name__ != "oncotrace.workflows":
    # The source folder was imported under its bare name (e.g. from the repository root, which
    # is on sys.path there): a second, unrelated copy of the stage. Refuse it.
    raise ImportError(
        f"this is OncoTrace's `workflows` stage, importable only as `oncotrace.workflows` "
        f"(got {__name__!r}): write `from oncotrace import workflows` after `pip install -e .`"
    )


from ._flags import FLAGS, cli_message, flag_for

__all__ = ["FLAGS", "cli_message", "flag_for"]
