"""What analytics refuses to compute, with a message for whoever asked: the CLI
prints it and exits with status 2, the HTTP API answers 400 with it."""

from __future__ import annotations


class AnalyticsError(ValueError):
    """A request for figures that cannot be answered as asked."""


class UnknownSite(AnalyticsError):
    """The site has never had a hit (a typo, most likely)."""


class BadRange(AnalyticsError):
    """The dates are malformed, reversed, too far apart or in the future."""
