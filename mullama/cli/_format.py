"""Output formatting shared by the commands: notes on standard error, sizes, times."""

from __future__ import annotations


def note(text: str) -> None:
    """One dim line on standard error (plain when that is not a terminal): standard output holds only the
    reply, for pipes."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[dim]{escape(text)}[/]")


def size(n_bytes: float) -> str:
    """``n_bytes`` in human units (decimal, as ollama prints them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit in ("B", "KB") or n_bytes >= 100 else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} TB"


def seconds_since(stamp: str) -> float | None:
    """Seconds from an ISO time (UTC when it names no zone) to now; None if it is not one."""
    import datetime

    try:
        then = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=datetime.timezone.utc)
    return (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()


def ago(stamp: str) -> str:
    """An ISO time as ``3 minutes ago``."""
    seconds = seconds_since(stamp)
    if seconds is None:
        return "-"
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = int(seconds // length)
            return f"{count} {unit}{'s' * (count > 1)} ago"
    return "just now"


def duration(seconds: float) -> str:
    """A number of seconds as ``42 s``, ``5 min`` or ``3 h``."""
    seconds = int(seconds)
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"


def until(stamp: str) -> str:
    """An ISO time in the future as ``4 min from now``."""
    since = seconds_since(stamp)
    return "-" if since is None else f"{duration(max(0.0, -since))} from now"
