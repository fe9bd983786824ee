"""Dollar amounts as Orchestra prints them (light: ``orchestra runs`` imports it)."""

from __future__ import annotations


def usd(amount: float) -> str:
    """Dollars: four decimals, or as many as a smaller amount needs to show (a cheap model's calls
    cost millionths of a dollar: ``$0.0000`` would read as free)."""
    if amount == 0 or amount >= 0.0001:
        return f"${amount:.4f}"
    return "$" + f"{amount:.10f}".rstrip("0")
