"""workflows — CLI, batch scoring of slides on Dask (:func:`score_slides`), demo."""

if __name__ != "oncotrace.workflows":
    # The source folder was imported under its bare name (e.g. from the repository root, which
    # is on sys.path there): a second, unrelated copy of the stage. Refuse it.
    raise ImportError(
        f"this is OncoTrace's `workflows` stage, importable only as `oncotrace.workflows` "
        f"(got {__name__!r}): write `from oncotrace import workflows` after `pip install -e .`"
    )


from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from ._viewer import (
        RunningServer,
        create_app,
        openseadragon_dir,
        setup_viewer,
        start_server,
    )

#: The viewer's names (``oncotrace view``), imported on first use: its server pulls in Starlette
#: and uvicorn, which ``import oncotrace.workflows`` must not pay for.
_VIEWER_NAMES = frozenset(
    {"RunningServer", "create_app", "openseadragon_dir", "setup_viewer", "start_server"}
)


def __getattr__(name: str) -> Any:
    if name in _VIEWER_NAMES:
        from . import _viewer

        value = getattr(_viewer, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_VIEWER_NAMES})


__all__ = [
    "FLAGS",
    "RunningServer",
    "ScoreConfig",
    "ScoreReport",
    "ScoreRun",
    "SlideJob",
    "cli_message",
    "collect_jobs",
    "create_app",
    "flag_for",
    "model_hash",
    "openseadragon_dir",
    "read_manifest",
    "resolve_tiling",
    "run_score",
    "score_slide",
    "score_slides",
    "scoring_encoder",
    "setup_viewer",
    "start_server",
    "write_outputs",
]
