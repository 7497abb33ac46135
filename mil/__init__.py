"""mil stage (see ../shared/ARCHITECTURE.md). Filled in by later issues."""

__all__: list[str] = []
