"""User-agent classification with maintained libraries: ua-parser for browser,
OS and device, CrawlerDetect for bots."""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from crawlerdetect import CrawlerDetect
from ua_parser import parse

_crawlers = CrawlerDetect()
_MOBILE_OS = frozenset({"Android", "iOS", "Windows Phone", "BlackBerry OS", "KaiOS"})
_DESKTOP_OS = frozenset({"Windows", "Mac OS X", "Linux", "Ubuntu", "Fedora", "Chrome OS",
                         "FreeBSD", "OpenBSD", "NetBSD", "Debian"})  # fmt: skip


class Agent(NamedTuple):
    browser: str | None
    os: str | None
    device: str  # desktop, mobile, tablet, bot or other
    is_bot: bool


# Visitors share a handful of user agents, so a cache makes parsing nearly free.
@lru_cache(maxsize=8192)
def classify(user_agent: str | None) -> Agent:
    if not user_agent:
        # Browsers always send one; a request without is a script.
        return Agent(None, None, "bot", True)
    result = parse(user_agent)
    browser = result.user_agent.family if result.user_agent else None
    os = result.os.family if result.os else None
    device_family = result.device.family if result.device else ""
    is_bot = device_family == "Spider" or _crawlers.is_crawler(user_agent)
    if is_bot:
        device = "bot"
    elif (
        device_family == "iPad"
        or "tablet" in user_agent.lower()
        or (os == "Android" and "Mobile" not in user_agent)
    ):
        device = "tablet"
    elif os in _MOBILE_OS:
        device = "mobile"
    elif os in _DESKTOP_OS:
        device = "desktop"
    else:
        device = "other"
    return Agent(_short(browser), _short(os), device, is_bot)


def warm_up() -> None:
    """Compile both libraries' regular expressions now (a quarter of a second),
    not inside the first request, where it would stall every thread of the worker."""
    _crawlers.is_crawler("Mozilla/5.0 (warm-up)")
    parse("Mozilla/5.0 (warm-up)")


def _short(family: str | None) -> str | None:
    return None if family in (None, "Other") else family[:64]
