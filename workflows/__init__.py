"""workflows — CLI, batch runs over folders of slides, demo."""

__all__: list[str] = []
