"""Dollar amounts as Orchestra prints them (light: ``orchestra runs`` imports it)."""

from __future__ import annotations


def usd(amount: float) -> str:
    """Dollars: four decimals, or as many as a smaller amount needs to show (a cheap model's calls
    cost millionths of a dollar: ``$0.0000`` would read as free)."""
    amount = _settled(amount)
    if amount <= 0 or amount >= 0.0001:
        return f"${amount:.4f}"
    return "$" + f"{amount:.10f}".rstrip("0")


def usd_exact(amount: float) -> str:
    """Dollars to the millionth (at least four decimals), for amounts set against a limit:
    ``$0.0011`` spent and ``$0.0004`` to come would seem to fit a limit of 0.0015 that ``$0.001053``
    and ``$0.000447`` do not."""
    amount = _settled(amount)
    if 0 < amount < 0.0001:  # (``usd`` shows every digit of those)
        return usd(amount)
    whole, _, decimals = f"{amount:.6f}".rstrip("0").partition(".")
    return f"${whole}.{decimals.ljust(4, '0')}"


def usd_alike(*amounts: float) -> list[str]:
    """``usd_exact`` of amounts set side by side, each to as many decimals as the most precise of them
    (``$0.000000 spent, the next call may cost $0.004516``: ``$0.0000`` beside it read as rounded)."""
    places = max(len(usd_exact(amount).partition(".")[2]) for amount in amounts)
    return [f"${_settled(amount):.{places}f}" for amount in amounts]


def dollars(amount: float) -> float:
    """A sum of prices as reported: to the 10^-12 dollar, so sums of the same costs made in another
    order (SQLite's, a run's as its answers came) read alike (0.000795, not 0.0007950000000000001)."""
    return round(amount, 12)


def _settled(amount: float) -> float:
    """``amount`` to the 10^-10 dollar, with no minus sign on zero: what is left of sums that cancel
    (a reservation taken back, 6.8e-21 or -0.0) printed as ``$0.`` and ``$-0.0000``."""
    return round(amount, 10) + 0.0
