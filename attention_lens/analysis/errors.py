"""The one error type every analysis raises for bad input."""


class AnalysisError(ValueError):
    """Bad input to an analysis (empty prompt, layer out of range, unknown word, ...).

    The message is written for the user and is safe to show in the UI or return as a
    400 response; it never contains a traceback.
    """
