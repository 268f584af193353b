"""Errors a user can act on. The CLI prints their message (no traceback) and exits with status 2."""


class MoeqError(Exception):
    """Base class: the message names the file, module or key at fault and what would fix it."""


class UnsupportedModelError(MoeqError):
    pass


class CheckpointError(MoeqError):
    pass


class RecipeError(MoeqError):
    pass


class GraphCaptureError(MoeqError):
    pass
