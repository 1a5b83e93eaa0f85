"""The one exception type users catch: every message says what was wrong and what to do."""


class SensiloraError(ValueError):
    """Bad input or an impossible request; the message names the culprit and the remedy."""


class BackendUnavailableError(RuntimeError):
    """A forced backend (``SENSILORA_BACKEND``) cannot run the requested op."""
