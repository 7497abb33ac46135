"""workflows — CLI, batch scoring of slides on Dask (:func:`score_slides`), demo."""

if __name__ != "oncotrace.workflows":
    # The source folder was imported under its bare name (e.g. from the repository root, which
    # is on sys.path there): a second, unrelated copy of the stage. Refuse it.
    raise ImportError(
        f"this is OncoTrace's `workflows` stage, importable only as `oncotrace.workflows` "
        f"(got {__name__!r}): write `from oncotrace import workflows` after `pip install -e .`"
    )


from ._flags import FLAGS, cli_message, flag_for
from ._score import (
    ScoreConfig,
    ScoreReport,
    ScoreRun,
    SlideJob,
    collect_jobs,
    model_hash,
    read_manifest,
    resolve_tiling,
    run_score,
    score_slide,
    score_slides,
    scoring_encoder,
    write_outputs,
)

__all__ = [
    "FLAGS",
    "ScoreConfig",
    "ScoreReport",
    "ScoreRun",
    "SlideJob",
    "cli_message",
    "collect_jobs",
    "flag_for",
    "model_hash",
    "read_manifest",
    "resolve_tiling",
    "run_score",
    "score_slide",
    "score_slides",
    "scoring_encoder",
    "write_outputs",
]
