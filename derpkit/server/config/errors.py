"""How start-up refuses a configuration: one line to print and the exit status derper uses."""

from __future__ import annotations


class ConfigError(Exception):
    """Start-up must stop: ``str(err)`` is the one line to print, ``exit_code`` the status.

    * exit 2: the command line or an env var could not be parsed (Go's ``flag`` package exits
      2 for these, so scripts checking derper's status keep working);
    * exit 1: a value parsed but derper would refuse it at start-up (``invalid server
      address``, ``unknown --home value``, cert-provider refusals), which derper reports with
      ``log.Fatal``, i.e. status 1;
    * exit 0: :class:`HelpRequested`.

    ``usage`` is set for command-line mistakes, where Go prints the usage after the message.
    ``flag``/``env`` name the setting and variable at fault, for tests and structured logs.
    """

    def __init__(
        self,
        message: str,
        exit_code: int = 2,
        *,
        usage: str | None = None,
        flag: str | None = None,
        env: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.usage = usage
        self.flag = flag
        self.env = env

    def stderr_text(self) -> str:
        """Everything to write to stderr, newline-terminated (message, then usage if any)."""
        text = self.message + "\n" if self.message else ""
        if self.usage:
            text += self.usage
        return text


class HelpRequested(ConfigError):
    """``-h``/``-help``/``--help``: print :attr:`usage` to stderr and exit 0, as Go does."""

    def __init__(self, usage_text: str) -> None:
        super().__init__("", 0, usage=usage_text)
